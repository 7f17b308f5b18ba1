"""The two WebSocket endpoints: thin handlers over :class:`server.chat.Chat`.

The Origin allow-list and the per-IP socket cap are checked before the upgrade
(``check_upgrade`` runs as request middleware), so a refused upgrade gets an HTTP 403/429.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from sanic import Blueprint, Request
from sanic.response import json as json_response

from . import protocol as P

bp = Blueprint("ws")


def client_ip(request: Request) -> str:
    return request.remote_addr or request.ip or "?"


def origin_allowed(origin: str | None, host: str, settings: dict[str, Any]) -> bool:
    if origin is None:
        return bool(settings["allow_no_origin"])
    # This server's own pages (the chat page inside the widget's iframe, the console) are
    # always allowed; `origins` adds the shops' sites that open sockets from their pages.
    if urlsplit(origin).netloc.lower() == host.lower():
        return True
    allowed = [o.rstrip("/").lower() for o in settings["origins"]]
    return "*" in allowed or origin.rstrip("/").lower() in allowed


async def check_upgrade(request: Request):
    if not request.path.startswith("/ws/"):
        return None
    ctx = request.app.ctx
    if not origin_allowed(request.headers.get("origin"), request.host, ctx.settings):
        ctx.metrics.inc("kefu_http_rejected_total", reason="origin")
        return json_response({"error": {"code": "forbidden", "message": "origin not allowed"}}, status=403)
    cap = int(ctx.settings["max_connections_per_ip"])
    if cap and ctx.chat.registry.count_ip(client_ip(request)) >= cap:
        ctx.metrics.inc("kefu_http_rejected_total", reason="connections_per_ip")
        return json_response({"error": {"code": "rate_limited", "message": "too many connections"}}, status=429)
    return None


def guard_utf8(ws: Any) -> None:
    """Close with 1007 on a text frame that is not UTF-8.  (Sanic's frame assembler raises
    UnicodeDecodeError in a background task and leaves the socket hanging otherwise.)"""
    process_events = getattr(ws, "process_events", None)
    if process_events is None:
        return

    async def checked(events: Any) -> None:
        try:
            await process_events(events)
        except UnicodeDecodeError:
            ws.fail_connection(P.CLOSE_INVALID_DATA, "invalid UTF-8")

    ws.process_events = checked


async def over_cap(request: Request, ws: Any) -> bool:
    """The per-IP cap again, once upgraded: ``check_upgrade`` cannot count the handshakes still
    in flight, so a burst (a reconnect storm) would all pass it.  Checking here and registering
    in ``chat.serve`` happen with no await in between, so the cap holds; the extra socket is
    closed with 4029 (back off)."""
    ctx = request.app.ctx
    cap = int(ctx.settings["max_connections_per_ip"])
    if cap and ctx.chat.registry.count_ip(client_ip(request)) >= cap:
        ctx.metrics.inc("kefu_http_rejected_total", reason="connections_per_ip")
        await ws.close(P.CLOSE_RATE_LIMITED, "too many connections")
        return True
    return False


@bp.websocket("/ws/visitor", subprotocols=P.SUBPROTOCOLS)
async def visitor_socket(request: Request, ws: Any) -> None:
    guard_utf8(ws)
    if not await over_cap(request, ws):
        await request.app.ctx.chat.serve(ws, "visitor", client_ip(request))


@bp.websocket("/ws/agent", subprotocols=P.SUBPROTOCOLS)
async def agent_socket(request: Request, ws: Any) -> None:
    guard_utf8(ws)
    if not await over_cap(request, ws):
        await request.app.ctx.chat.serve(ws, "agent", client_ip(request))
