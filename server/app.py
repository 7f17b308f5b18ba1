"""The app factory: the only place that wires engine, storage, router and connections.

Everything is opened per worker in ``before_server_start`` and closed in
``after_server_stop`` on a typed ``app.ctx``; nothing happens at import time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from engine import Config, ConfigError, Engine, KefuError
from sanic import Sanic

from . import api, ws
from .auth import Tokens, hash_password
from .chat import Chat
from .config import database_url, load_server_config, secret_key, server_settings
from .connections import WindowCounter
from .metrics import Metrics

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass
class KefuContext:
    """What a worker holds: ``app.ctx``."""

    config: Config
    settings: dict[str, Any]
    plugins: tuple[object, ...] = ()
    load_entrypoints: bool = True
    metrics: Metrics = field(default_factory=Metrics)
    engine: Engine | None = None
    storage: Any = None
    router: Any = None
    chat: Chat | None = None
    tokens: Tokens | None = None
    login_failures: WindowCounter | None = None
    reply_limit: WindowCounter | None = None
    dummy_hash: str = ""


class KefuApp(Sanic):
    """Sanic, negotiating the optional ``kefu.msgpack`` subprotocol: a client that asks for
    none gets JSON (plain Sanic would refuse it with "missing subprotocol")."""

    async def _websocket_handler(self, handler, request, *args, subprotocols=None, **kwargs):  # type: ignore[override]
        if subprotocols and not request.headers.get("sec-websocket-protocol"):
            subprotocols = None
        return await super()._websocket_handler(handler, request, *args, subprotocols=subprotocols, **kwargs)


def bot_teams(value: Any) -> dict[str, str]:
    """``[server] bot_teams``: a table bot -> team (a conversation belongs to its bot's team;
    a bot not listed to "default")."""
    if not value:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                              for k, v in value.items()):
        raise ConfigError('server.bot_teams must be a table of bot = "team" strings')
    return {k: v.strip() for k, v in value.items()}


def parse_business_hours(value: Any, tz: str) -> dict[str, Any] | None:
    """``"mon-fri 09:00-18:00; sat 10:00-14:00"`` or a table ``{mon = "09:00-18:00"}`` ->
    the router's BusinessHours config; empty -> None (always open)."""
    if not value:
        return None
    if isinstance(value, dict):
        return {"timezone": tz, "hours": value}
    hours: dict[str, list[str]] = {}
    for part in str(value).split(";"):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"([a-z]{3})(?:\s*-\s*([a-z]{3}))?\s+(.+)", part.lower())
        if not m or m[1] not in _DAYS or (m[2] and m[2] not in _DAYS):
            raise ConfigError(f"server.business_hours: cannot read {part!r} (want e.g. 'mon-fri 09:00-18:00')")
        first, last = _DAYS.index(m[1]), _DAYS.index(m[2] or m[1])
        days = [_DAYS[i % 7] for i in range(first, (last if last >= first else last + 7) + 1)]
        for day in days:
            hours.setdefault(day, []).append(m[3])
    return {"timezone": tz, "hours": hours}


def create_app(config: Config | None = None, *, plugins: Iterable[object] = (), load_entrypoints: bool = True,
               name: str = "kefu") -> Sanic:
    """A Sanic app serving kefu.  ``plugins`` are extra engine plugins (tests use a small bot)."""
    config = config or load_server_config()
    settings = server_settings(config)
    parse_business_hours(settings["business_hours"], str(settings["timezone"]))  # fail early on a typo
    ctx = KefuContext(config=config, settings=settings, plugins=tuple(plugins), load_entrypoints=load_entrypoints)
    app: Sanic = KefuApp(name, ctx=ctx)
    app.config.WEBSOCKET_MAX_SIZE = int(settings["max_frame_bytes"])
    app.config.WEBSOCKET_PING_INTERVAL = None     # heartbeats come from our one timing wheel
    app.config.WEBSOCKET_PING_TIMEOUT = None
    app.config.REQUEST_MAX_SIZE = 1024 * 1024
    app.config.REQUEST_TIMEOUT = 15               # slowloris: a request (or upgrade) must arrive this fast
    app.config.PROXIES_COUNT = int(settings["proxies_count"])
    app.config.ACCESS_LOG = False                 # tokens never travel in URLs, but keep logs lean anyway
    app.config.NOISY_EXCEPTIONS = False
    app.config.MOTD = False

    app.blueprint(api.bp)
    app.blueprint(api.ops)
    app.blueprint(ws.bp)
    app.on_request(ws.check_upgrade)
    app.on_response(_security_headers)
    app.error_handler.add(KefuError, api.error_response)
    _static(app, settings)

    app.before_server_start(_open)
    app.before_server_stop(_going_away)
    app.after_server_stop(_close)
    return app


async def _open(app: Sanic, _loop: Any = None) -> None:
    from .routing import BusinessHours, Router
    from .storage import open_storage

    ctx: KefuContext = app.ctx
    s = ctx.settings
    ctx.storage = await open_storage(database_url(s))
    engine = Engine(ctx.config, plugins=ctx.plugins, load_entrypoints=ctx.load_entrypoints)
    await engine.start()
    if ctx.config["engine"].get("watch_knowledge"):
        engine.watch()
    ctx.engine = engine
    ctx.tokens = Tokens(secret_key(s), agent_ttl_s=float(s["agent_token_ttl_s"]),
                        visitor_ttl_s=float(s["visitor_token_ttl_s"]))
    ctx.login_failures = WindowCounter(int(s["login_failures_per_ip_per_min"]))
    ctx.reply_limit = WindowCounter(int(float(s["rate_per_s"]) * 60 * 4))
    ctx.dummy_hash = hash_password("not a real password")
    holder: dict[str, Chat] = {}

    async def notify(event: Any) -> None:
        await holder["chat"].on_route(event)

    hours = parse_business_hours(s["business_hours"], str(s["timezone"]))
    ctx.router = Router(ctx.storage, grace_s=float(s["grace_s"]),
                        business_hours=BusinessHours.from_config(hours), notify=notify,
                        bot_teams=bot_teams(s.get("bot_teams")))
    chat = holder["chat"] = Chat(s, engine=engine, storage=ctx.storage, router=ctx.router,
                                 tokens=ctx.tokens, metrics=ctx.metrics)
    ctx.chat = chat
    chat.window_counters += [ctx.login_failures, ctx.reply_limit]   # evicted by the same tick
    await ctx.router.restore()
    registry = chat.registry
    ctx.metrics.gauge("kefu_connections", lambda: len(registry.connections), "Open WebSocket connections.")
    ctx.metrics.gauge("kefu_connections_peak", lambda: registry.peak, "Most WebSocket connections open at once.")
    ctx.metrics.gauge("kefu_agents_online", lambda: len(registry.by_agent), "Agents with a socket open.")
    ctx.metrics.gauge("kefu_queue_length", lambda: len(ctx.router.queue()), "Conversations waiting for an agent.")
    chat.start()


async def _going_away(app: Sanic, _loop: Any = None) -> None:
    if app.ctx.chat is not None:
        await app.ctx.chat.going_away()


async def _close(app: Sanic, _loop: Any = None) -> None:
    ctx: KefuContext = app.ctx
    if ctx.chat is not None:
        await ctx.chat.stop()
    if ctx.router is not None:
        await ctx.router.drain()      # routing operations whose callers were cancelled
    if ctx.engine is not None:
        await ctx.engine.close()
    if ctx.storage is not None:
        await ctx.storage.close()


async def _security_headers(request: Any, response: Any) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if (response.content_type or "").startswith("text/html"):
        origins = " ".join(request.app.ctx.settings["origins"])
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; object-src 'none'; "
            f"base-uri 'none'; frame-ancestors 'self' {origins}".strip())


def _static(app: Sanic, settings: dict[str, Any]) -> None:
    """The visitor page, the widget and the agent console (server/static), when present."""
    folder = Path(__file__).with_name("static")
    if not folder.is_dir():
        return
    app.static("/static", folder, name="static")
    for url, filename in (("/", "chat.html"), ("/chat", "chat.html"), ("/console", "console.html"),
                          ("/widget.js", "widget.js")):
        if (folder / filename).is_file():
            app.static(url, folder / filename, name=f"page_{filename.replace('.', '_')}_{url.strip('/') or 'root'}")
