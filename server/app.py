"""The app factory: the only place that wires the server's parts together.

Everything is opened per worker in ``before_server_start`` and closed in ``after_server_stop``
on a typed ``app.ctx``; nothing happens at import time.  One worker with no Redis uses the
in-process seams (broker, routing state, session memory, limits); with ``server.redis_url``
set, the Redis ones, so any number of workers and nodes share the work.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from engine import Config, Engine, KefuError
from sanic import Sanic

from . import api, ws
from .agent_desk import AgentDesk
from .auth import Tokens, hash_password
from .bot_turns import BotTurns
from .broker import Broker, InProcessBroker
from .config import Settings, database_url, load_server_config, secret_key
from .connections import Registry
from .conversations import Conversations
from .limits import (ConnectionCap, LocalConnectionCap, LocalWindowCounter, RedisConnectionCap,
                     RedisWindowCounter, WindowCounter)
from .metrics import Metrics
from .redis_client import WorkerIdentity, open_checked
from .routing import InMemoryRoutingState, Router, RoutingError, RoutingState, business_hours
from .sessions import Sessions
from .storage.base import StorageError
from .visitor_desk import VisitorDesk

log = logging.getLogger("kefu.server")


@dataclass
class KefuContext:
    """What a worker holds: ``app.ctx``."""

    config: Config
    settings: Settings
    plugins: tuple[object, ...] = ()
    load_entrypoints: bool = True
    metrics: Metrics = field(default_factory=Metrics)
    worker: WorkerIdentity | None = None
    redis: Any = None
    shared_metrics: Any = None       # server.redis_metrics.SharedMetrics, with Redis
    engine: Engine | None = None
    storage: Any = None
    state: RoutingState | None = None
    router: Router | None = None
    broker: Broker | None = None
    registry: Registry | None = None
    hub: Conversations | None = None
    sessions: Sessions | None = None
    visitors: VisitorDesk | None = None
    agents: AgentDesk | None = None
    bots: BotTurns | None = None
    tokens: Tokens | None = None
    caps: ConnectionCap | None = None
    new_conversations: WindowCounter | None = None
    visitor_sessions: WindowCounter | None = None
    login_failures: WindowCounter | None = None
    account_login_failures: WindowCounter | None = None
    reply_limit: WindowCounter | None = None
    dummy_hash: str = ""
    background: set[asyncio.Task] = field(default_factory=set)


class KefuApp(Sanic):
    """Sanic, negotiating the optional ``kefu.msgpack`` subprotocol: a client that asks for
    none gets JSON (plain Sanic would refuse it with "missing subprotocol")."""

    async def _websocket_handler(self, handler, request, *args, subprotocols=None, **kwargs):  # type: ignore[override]
        if subprotocols and not request.headers.get("sec-websocket-protocol"):
            subprotocols = None
        return await super()._websocket_handler(handler, request, *args, subprotocols=subprotocols, **kwargs)


def create_app(config: Config | None = None, *, plugins: Iterable[object] = (), load_entrypoints: bool = True,
               name: str = "kefu") -> Sanic:
    """A Sanic app serving kefu.  ``plugins`` are extra engine plugins (tests use a small bot)."""
    config = config or load_server_config()
    settings = Settings.from_config(config)
    business_hours(settings.business_hours, settings.timezone)   # fail early on a typo
    ctx = KefuContext(config=config, settings=settings, plugins=tuple(plugins), load_entrypoints=load_entrypoints)
    app: Sanic = KefuApp(name, ctx=ctx)
    app.config.WEBSOCKET_MAX_SIZE = settings.max_frame_bytes
    app.config.WEBSOCKET_PING_INTERVAL = None     # heartbeats come from our one timing wheel
    app.config.WEBSOCKET_PING_TIMEOUT = None
    app.config.REQUEST_MAX_SIZE = 1024 * 1024
    app.config.REQUEST_TIMEOUT = 15               # slowloris: a request (or upgrade) must arrive this fast
    app.config.PROXIES_COUNT = settings.proxies_count
    app.config.ACCESS_LOG = False                 # tokens never travel in URLs, but keep logs lean anyway
    app.config.NOISY_EXCEPTIONS = False
    app.config.MOTD = False

    app.blueprint(api.bp)
    app.blueprint(api.ops)
    app.blueprint(ws.bp)
    app.on_request(ws.check_upgrade)
    app.on_response(_security_headers)
    app.error_handler.add(KefuError, api.error_response)
    from sanic.exceptions import SanicException
    app.error_handler.add(SanicException, api.sanic_error_response)
    _static(app)

    app.before_server_start(_open)
    app.before_server_stop(_going_away)
    app.after_server_stop(_close)
    return app


def worker_index() -> int:
    """This worker's number on its node (Sanic names its worker processes ``...Server-N-...``)."""
    m = re.search(r"Server-(\d+)", os.environ.get("SANIC_WORKER_NAME", ""))
    return int(m[1]) if m else 0


async def _open(app: Sanic, _loop: Any = None) -> None:
    from .storage import open_storage

    ctx: KefuContext = app.ctx
    s = ctx.settings
    worker = ctx.worker = WorkerIdentity.make(s.node_id, s.port, worker_index())
    memory = None
    if s.shared:
        from .redis_broker import RedisBroker
        from .redis_memory import RedisMemoryStore
        from .routing.redis_state import RedisRoutingState

        ctx.redis = await open_checked(s.redis_url)
        memory = RedisMemoryStore(ctx.redis, prefix=s.redis_prefix, ttl_s=float(ctx.config["engine"]["memory_ttl_s"]))
        ctx.state = RedisRoutingState(ctx.redis, prefix=s.redis_prefix, worker_id=worker.id,
                                      presence_ttl_s=s.presence_ttl_s)
        ctx.broker = RedisBroker(ctx.redis, prefix=s.redis_prefix, worker_id=worker.id, metrics=ctx.metrics)

        def counter(name: str, limit: int) -> WindowCounter:
            return RedisWindowCounter(ctx.redis, s.redis_prefix, name, limit)
        ctx.caps = RedisConnectionCap(ctx.redis, s.redis_prefix, worker.id, s.max_connections_per_ip,
                                      spawn=lambda coro, name: _spawn(ctx, coro, name))
    else:
        ctx.state = InMemoryRoutingState()
        ctx.broker = InProcessBroker()

        def counter(name: str, limit: int) -> WindowCounter:
            return LocalWindowCounter(limit)
        ctx.caps = LocalConnectionCap(s.max_connections_per_ip)
    ctx.new_conversations = counter("new_conversations", s.new_conversations_per_ip_per_min)
    ctx.visitor_sessions = counter("visitor_sessions", s.visitor_sessions_per_ip_per_min)
    ctx.login_failures = counter("login_failures", s.login_failures_per_ip_per_min)
    ctx.account_login_failures = counter("account_login_failures", s.login_failures_per_account_per_min)
    ctx.reply_limit = counter("bot_replies", int(s.rate_per_s * 60 * 4))

    ctx.storage = await open_storage(database_url(s))
    engine = Engine(ctx.config, plugins=ctx.plugins, load_entrypoints=ctx.load_entrypoints, memory=memory)
    await engine.start()
    if ctx.config["engine"].get("watch_knowledge"):
        engine.watch()
    ctx.engine = engine
    ctx.tokens = Tokens(secret_key(s), agent_ttl_s=s.agent_token_ttl_s, visitor_ttl_s=s.visitor_token_ttl_s)
    ctx.dummy_hash = hash_password("not a real password")
    await ctx.state.start()

    registry = ctx.registry = Registry()
    hub = ctx.hub = Conversations(storage=ctx.storage, broker=ctx.broker, registry=registry, metrics=ctx.metrics,
                                  resume_max_messages=s.resume_max_messages, tasks=ctx.background)
    holder: dict[str, AgentDesk] = {}

    async def notify(event: Any) -> None:
        await holder["agents"].on_route(event)

    async def new_generation() -> None:
        await holder["agents"].resync()

    router = ctx.router = Router(ctx.storage, grace_s=s.grace_s,
                                 business_hours=business_hours(s.business_hours, s.timezone), notify=notify,
                                 clock=time.time if s.shared else time.monotonic, state=ctx.state,
                                 bot_teams=s.bot_teams, on_new_generation=new_generation)
    bots = ctx.bots = BotTurns(s, engine=engine, hub=hub, storage=ctx.storage, router=router, metrics=ctx.metrics)
    agents = ctx.agents = holder["agents"] = AgentDesk(s, engine=engine, hub=hub, storage=ctx.storage, router=router,
                                                       tokens=ctx.tokens, registry=registry, metrics=ctx.metrics)
    visitors = ctx.visitors = VisitorDesk(s, engine=engine, hub=hub, storage=ctx.storage, tokens=ctx.tokens,
                                          bots=bots, metrics=ctx.metrics, new_conversations=ctx.new_conversations)

    queue_length = [0]
    routing_down = [False]
    tokens_checked = [time.monotonic()]
    purged = [time.monotonic() - RETENTION_EVERY_S + 60.0]      # the first purge a minute after start

    async def tick() -> None:
        if s.retention_days > 0 and time.monotonic() - purged[0] >= RETENTION_EVERY_S:
            purged[0] = time.monotonic()
            await purge_expired(ctx)
        if time.monotonic() - tokens_checked[0] >= s.token_check_s:
            tokens_checked[0] = time.monotonic()
            try:
                await agents.check_tokens()
            except StorageError as exc:
                log.warning("agent tokens not re-checked: %s", exc)
        try:
            await router.tick()
            queue_length[0] = await ctx.state.queue_size()   # (the gauge below reads it: gauges are synchronous)
        except RoutingError as exc:
            # Redis away: said once per outage, not a traceback every second
            if not routing_down[0]:
                log.warning("routing paused: %s (retrying every second)", exc.message)
            routing_down[0] = True
            return
        if routing_down[0]:
            log.warning("routing resumed")
        routing_down[0] = False

    sessions = ctx.sessions = Sessions(s, hub=hub, registry=registry, metrics=ctx.metrics, caps=ctx.caps,
                                       window_counters=[ctx.new_conversations, ctx.login_failures, ctx.reply_limit,
                                                        ctx.visitor_sessions, ctx.account_login_failures],
                                       on_tick=tick, node=f"{worker.node}/{worker.index}")
    sessions.add_desk("visitor", visitors)
    sessions.add_desk("agent", agents)
    visitors.sessions = agents.sessions = sessions
    visitors.agents = agents
    bots.queue_changed = agents.tell_queue

    async def recovered() -> None:
        """The broker is back after an outage: repair by seq, re-announce, reconcile routing."""
        await hub.recover()
        await agents.resync()
        await router.restore()

    ctx.broker.on_recovered = recovered
    await ctx.broker.start()
    await router.start()
    _gauges(ctx)
    ctx.metrics.gauge("kefu_queue_length", lambda: queue_length[0],
                      "Conversations waiting for an agent (of every worker: the same on each).")
    if s.shared:
        from .redis_metrics import SharedMetrics

        ctx.shared_metrics = SharedMetrics(ctx.redis, ctx.metrics, prefix=s.redis_prefix, worker_id=worker.id,
                                           push_s=s.metrics_push_s)
        await ctx.shared_metrics.start()
    sessions.start()


#: How often each worker runs the retention purge (deleting is idempotent: workers may overlap).
RETENTION_EVERY_S = 3600.0


async def purge_expired(ctx: KefuContext) -> int:
    """Retention: closed conversations (with their messages) closed more than
    ``server.retention_days`` ago are deleted; returns how many."""
    days = ctx.settings.retention_days
    if days <= 0:
        return 0
    try:
        deleted = await ctx.storage.delete_closed_conversations(closed_before=time.time() - days * 86400)
    except StorageError as exc:
        log.warning("retention: old conversations not deleted this time (%s)", exc)
        return 0
    if deleted:
        ctx.metrics.inc("kefu_retention_deleted_total", deleted)
        log.info("retention: %d conversation(s) closed more than %g days ago deleted", deleted, days)
    return deleted


def _gauges(ctx: KefuContext) -> None:
    registry, metrics = ctx.registry, ctx.metrics
    assert registry is not None
    metrics.gauge("kefu_connections", lambda: len(registry.connections), "Open WebSocket connections.")
    metrics.gauge("kefu_connections_peak", lambda: registry.peak, "Most WebSocket connections open at once.")
    metrics.gauge("kefu_agents_online", lambda: len(registry.by_agent), "Agents with a socket open.")
    metrics.gauge("kefu_broker_connected", lambda: 1.0 if ctx.broker and ctx.broker.status()["connected"] else 0.0,
                  "1 while the broker (Redis pub/sub, or in process) is connected.")


def _spawn(ctx: KefuContext, coro: Any, name: str) -> None:
    task = asyncio.create_task(coro, name=name)
    ctx.background.add(task)
    task.add_done_callback(ctx.background.discard)


async def _going_away(app: Sanic, _loop: Any = None) -> None:
    if app.ctx.sessions is not None:
        await app.ctx.sessions.going_away()


async def _close(app: Sanic, _loop: Any = None) -> None:
    ctx: KefuContext = app.ctx
    if ctx.sessions is not None:
        await ctx.sessions.stop()
    if ctx.bots is not None:
        await ctx.bots.stop()
    if ctx.router is not None:
        await ctx.router.drain()      # routing operations whose callers were cancelled
    if ctx.background:
        await asyncio.wait(list(ctx.background), timeout=2.0)
    for task in list(ctx.background) + list(ctx.agents.tasks if ctx.agents else ()):
        task.cancel()
    if ctx.engine is not None:
        await ctx.engine.close()
    if ctx.shared_metrics is not None:
        await ctx.shared_metrics.close()
    if ctx.broker is not None:
        await ctx.broker.close()
    if ctx.state is not None:
        await ctx.state.close()
    if ctx.storage is not None:
        await ctx.storage.close()
    if ctx.redis is not None:
        await ctx.redis.aclose()


async def _security_headers(request: Any, response: Any) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")     # page addresses stay here
    if (response.content_type or "").startswith("text/html"):
        # Sockets and requests to this server only (``ws:``/``wss:`` alone allowed any host).
        host = request.host
        connect = f"'self' ws://{host} wss://{host}" if host and _HOST.fullmatch(host) else "'self'"
        # The console is never framed; the chat page may be, by the shops that embed the widget.
        ancestors = "'none'" if request.path.rstrip("/") == "/console" else \
            " ".join(["'self'", *request.app.ctx.settings.origins])
        response.headers.setdefault(
            "Content-Security-Policy",
            f"default-src 'self'; connect-src {connect}; img-src 'self' data:; object-src 'none'; "
            f"base-uri 'none'; frame-ancestors {ancestors}")


_HOST = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")


def _static(app: Sanic) -> None:
    """The visitor page, the widget and the agent console (server/static), when present.

    ``/static/<name>`` is served by a handler of ours rather than Sanic's directory route, which
    answered 500 for a NUL in the path (``/static/%00``) or a name too long for the file system.
    Only a plain name is looked up (ASCII letters, digits, ``-_.``, ``/`` between parts, no part
    starting with a dot, at most 255 characters, taken as it came: no percent-decoding); any other
    name, and any that is not a file inside the folder, is a JSON 404 like every other error."""
    from sanic.response import file
    from sanic.response.convenience import guess_content_type

    from .errors import NotFound

    folder = Path(__file__).with_name("static")
    if not folder.is_dir():
        return
    root = folder.resolve()
    plain = re.compile(r"(?:[A-Za-z0-9_-][A-Za-z0-9._-]*/)*[A-Za-z0-9_-][A-Za-z0-9._-]*")

    async def static_file(request: Any, name: str) -> Any:
        path = root / name if len(name) <= 255 and plain.fullmatch(name) else None
        if path is None or not path.is_file() or not path.resolve().is_relative_to(root):
            raise NotFound("no such file")
        content_type = guess_content_type(path)
        if content_type in ("application/javascript", "text/javascript"):
            content_type += "; charset=utf-8"
        return await file(path, request_headers=request.headers, mime_type=content_type)

    app.route("/static/<name:path>", methods=["GET", "HEAD"], name="static")(static_file)
    for url, filename in (("/", "chat.html"), ("/chat", "chat.html"), ("/console", "console.html"),
                          ("/widget.js", "widget.js")):
        if (folder / filename).is_file():
            app.static(url, folder / filename, name=f"page_{filename.replace('.', '_')}_{url.strip('/') or 'root'}")
