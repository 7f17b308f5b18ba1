"""The two WebSocket endpoints: thin handlers over :class:`server.sessions.Sessions`.

The Origin allow-list and the per-IP socket cap are checked before the upgrade
(``check_upgrade`` runs as request middleware), so a refused upgrade gets an HTTP 403/429;
the cap is counted again, atomically, once upgraded (``Sessions.serve``).
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from sanic import Blueprint, Request
from sanic.response import json as json_response

from . import protocol as P
from .config import Settings

bp = Blueprint("ws")


def client_ip(request: Request) -> str:
    return request.remote_addr or request.ip or "?"


def origin_allowed(origin: str | None, host: str, settings: Settings, scheme: str = "http") -> bool:
    """May a page of ``origin`` open a socket here?  The shops' sites in ``origins``, and this
    server's own pages (the chat page in the widget's iframe, the console): with
    ``public_urls`` set, exactly those origins (scheme, host and port), since the ``Host``
    header is the client's to choose (a DNS-rebinding page has its own name there and in its
    Origin); without, the request's own host and scheme (for development)."""
    if origin is None:
        return settings.allow_no_origin
    origin = origin.rstrip("/").lower()
    allowed = [o.rstrip("/").lower() for o in settings.origins]
    if "*" in allowed or origin in allowed:
        return True
    if settings.public_urls:
        return origin in [u.rstrip("/").lower() for u in settings.public_urls]
    parts = urlsplit(origin)
    own_scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    return parts.netloc == host.lower() and parts.scheme == own_scheme


async def check_upgrade(request: Request):
    if not request.path.startswith("/ws/"):
        return None
    ctx = request.app.ctx
    if not origin_allowed(request.headers.get("origin"), request.host, ctx.settings, request.scheme):
        ctx.metrics.inc("kefu_http_rejected_total", reason="origin")
        return json_response({"error": {"code": "forbidden", "message": "origin not allowed"}}, status=403)
    cap = ctx.caps.limit
    if cap and await ctx.caps.count(client_ip(request)) >= cap:
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


@bp.websocket("/ws/visitor", subprotocols=P.SUBPROTOCOLS)
async def visitor_socket(request: Request, ws: Any) -> None:
    guard_utf8(ws)
    await request.app.ctx.sessions.serve(ws, "visitor", client_ip(request))


@bp.websocket("/ws/agent", subprotocols=P.SUBPROTOCOLS)
async def agent_socket(request: Request, ws: Any) -> None:
    guard_utf8(ws)
    await request.app.ctx.sessions.serve(ws, "agent", client_ip(request))
