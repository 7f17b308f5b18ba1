"""Sockets: one socket's loop, frame dispatch, rate limit, errors, heartbeat; and the frames both
kinds of client send (typing, read, sync, ping).

What a frame *does* is the desks' business (:mod:`server.visitor_desk`,
:mod:`server.agent_desk`); messages go through the hub (:mod:`server.conversations`).  This
module never touches storage.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Protocol

from engine import KefuError
from websockets.exceptions import ConnectionClosed

from . import protocol as P
from .config import Settings
from .connections import Connection, Registry, TimingWheel
from .conversations import ConvState, Conversations
from .limits import ConnectionCap, WindowCounter
from .metrics import Metrics
from .storage.base import StorageError

log = logging.getLogger("kefu.server")

Handler = Callable[[Connection, dict[str, Any]], Awaitable[None]]

#: A socket whose frames the token bucket refuses RATE_REFUSALS times within
#: RATE_REFUSAL_WINDOW_S seconds is closed with 4029, accepted frames in between or not (a
#: flood paced a little above the rate has accepted frames between its refused ones).
RATE_REFUSALS = 5
RATE_REFUSAL_WINDOW_S = 10.0
#: Typing frames are forwarded at most once per TYPING_INTERVAL_S per socket and conversation.
TYPING_INTERVAL_S = 0.25


class Desk(Protocol):
    """What a desk gives the session layer."""

    handlers: dict[str, Handler]

    def conversation_of(self, conn: Connection, frame: dict[str, Any]) -> ConvState: ...

    async def disconnected(self, conn: Connection) -> None: ...


class _TypingGate:
    """One socket's typing in one conversation (:meth:`Sessions.typing`)."""

    __slots__ = ("sent_at", "state", "pending", "timer")

    def __init__(self) -> None:
        self.sent_at = float("-inf")                    # when a typing frame was last forwarded
        self.state: bool | None = None                  # the state it carried
        self.pending = False                            # the change waiting for the interval's end
        self.timer: asyncio.TimerHandle | None = None   # set while a change waits


class Sessions:
    def __init__(self, settings: Settings, *, hub: Conversations, registry: Registry, metrics: Metrics,
                 caps: ConnectionCap, window_counters: list[WindowCounter],
                 on_tick: Callable[[], Awaitable[None]], node: str = "") -> None:
        self.s, self.hub, self.registry, self.metrics, self.caps = settings, hub, registry, metrics, caps
        self.window_counters = window_counters        # swept every second
        self.desks: dict[str, Desk] = {}
        self._on_tick = on_tick
        self.wheel = TimingWheel(settings.tick_s, self._check_conn, self._tick)
        self._since_tick = 0.0
        self.node = node          # "node/worker", in welcome frames (diagnostics: which worker served a socket)

    def add_desk(self, kind: str, desk: Desk) -> None:
        common: dict[str, Handler] = {"typing": self.typing, "read": self.read, "sync": self.sync,
                                      "ping": self.ping}
        desk.handlers = {**common, **desk.handlers}
        self.desks[kind] = desk

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.wheel.start()

    async def going_away(self, timeout: float = 2.0) -> None:
        """Close every socket with 1001 while the server still runs (before Sanic closes them
        with 1000, "normal closure", which a client may take as final), waiting up to
        ``timeout`` for the close frames to go out."""
        conns = list(self.registry.connections)
        for conn in conns:
            conn.close(P.CLOSE_GOING_AWAY, "server shutting down")
        writers = [conn.writer for conn in conns if not conn.writer.done()]
        if writers:
            await asyncio.wait(writers, timeout=timeout)

    async def stop(self) -> None:
        await self.wheel.stop()
        await self.going_away(timeout=0)   # any socket left after the before-stop round

    # -- one socket: the handlers in server/ws.py call this ----------------------------------

    async def serve(self, ws: Any, kind: str, ip: str) -> None:
        if not await self.caps.acquire(ip):
            # (the upgrade passed the HTTP check, but a burst of others got there first)
            self.metrics.inc("kefu_http_rejected_total", reason="connections_per_ip")
            await ws.close(P.CLOSE_RATE_LIMITED, "too many connections")
            return
        s = self.s
        desk = self.desks[kind]
        try:
            conn = Connection(ws, kind=kind, ip=ip, binary=getattr(ws, "subprotocol", None) == P.MSGPACK,
                              queue_frames=s.send_queue_frames, rate_per_s=s.rate_per_s,
                              rate_burst=s.rate_burst, on_close=self._closed_by_server)
        except BaseException:
            self.caps.release(ip)
            raise
        self.registry.add(conn)
        self.wheel.schedule(conn, s.auth_timeout_s)
        self.metrics.inc("kefu_connections_opened_total", kind=kind)
        try:
            while not conn.closed:
                try:
                    data = await ws.recv()
                except (ConnectionClosed, asyncio.CancelledError):
                    break
                if data is None:
                    break
                conn.last_seen = time.monotonic()
                await self.on_frame(conn, data, desk.handlers)
        finally:
            await self.unregister(conn, desk)

    async def unregister(self, conn: Connection, desk: Desk) -> None:
        self.wheel.cancel(conn)
        for cid in self.registry.remove(conn):
            self.hub.release(cid)
        self.caps.release(conn.ip)
        await conn.finish()
        try:
            await desk.disconnected(conn)
        except Exception:
            log.exception("%s disconnect handling failed for %r", conn.kind, conn)

    def _closed_by_server(self, conn: Connection, code: int) -> None:
        self.metrics.inc("kefu_connections_closed_total", code=str(code))
        self.wheel.cancel(conn)
        for cid in self.registry.remove(conn):   # no more fan-out to it; the handler finishes the rest
            self.hub.release(cid)

    async def on_frame(self, conn: Connection, data: str | bytes, handlers: dict[str, Handler]) -> None:
        try:
            frame = conn.codec.decode(data)
        except P.FrameError as exc:
            if self._over_rate(conn, 1.0):
                return
            return self.frame_error(conn, exc.code, exc.message, None)
        ftype = frame["type"]
        cost = 0.0 if ftype == "ping" else 0.25 if ftype in ("typing", "suggest") else 1.0
        if self._over_rate(conn, cost):
            return
        client_id = frame.get("id") if isinstance(frame.get("id"), str) else None
        handler = handlers.get(ftype)
        if handler is None:
            return self.frame_error(conn, P.UNKNOWN_TYPE, f"unknown frame type {ftype[:40]!r}", client_id)
        if not conn.authed and ftype != "hello":
            return self.frame_error(conn, P.NOT_HELLO, "send hello first", client_id)
        if conn.authed and ftype == "hello":
            return self.frame_error(conn, P.BAD_STATE, "already said hello", client_id)
        try:
            await handler(conn, frame)
        except P.FrameError as exc:
            self.frame_error(conn, exc.code, exc.message, exc.client_id or client_id)
        except StorageError as exc:
            log.warning("storage failed: %s", exc)
            conn.send(P.error_frame(P.STORAGE, "not stored; retry with the same id", client_id))
        except KefuError as exc:
            self.frame_error(conn, exc.code, exc.message, client_id)
        except Exception:
            log.exception("frame %s from %r failed", ftype, conn)
            conn.send(P.error_frame(P.INTERNAL, "internal error", client_id))

    def _over_rate(self, conn: Connection, cost: float) -> bool:
        """True when the bucket refuses the frame (it is dropped).  The first refusal after
        an accepted frame gets error ``rate_limited``; the RATE_REFUSALS-th within
        RATE_REFUSAL_WINDOW_S closes the socket with 4029."""
        if cost == 0 or conn.bucket.take(cost):
            conn.limited = False
            return False
        now = time.monotonic()
        refusals = conn.refusals
        refusals.append(now)
        while len(refusals) > RATE_REFUSALS or now - refusals[0] > RATE_REFUSAL_WINDOW_S:
            refusals.popleft()
        self.metrics.inc("kefu_frames_rejected_total", code=P.RATE_LIMITED)
        if not conn.limited:
            conn.limited = True
            conn.send(P.error_frame(P.RATE_LIMITED, "too many frames; slow down"))
        if len(refusals) >= RATE_REFUSALS:
            conn.close(P.CLOSE_RATE_LIMITED, "rate limit")
        return True

    def frame_error(self, conn: Connection, code: str, message: str, client_id: str | None) -> None:
        conn.errors += 1
        self.metrics.inc("kefu_frames_rejected_total", code=code)
        conn.send(P.error_frame(code, message, client_id))
        if conn.errors >= self.s.max_errors:
            conn.close(P.CLOSE_TOO_MANY_ERRORS, "too many errors")

    def refuse(self, conn: Connection, code: str, message: str, close_code: int) -> None:
        """An error frame, then the close (the frame goes out first)."""
        self.metrics.inc("kefu_frames_rejected_total", code=code)
        conn.send(P.error_frame(code, message))
        conn.close(close_code, message[:100])

    def authenticated(self, conn: Connection) -> None:
        """The socket said a valid hello: indexed by who it is, on the heartbeat schedule."""
        self.registry.identify(conn)
        self.wheel.schedule(conn, self.s.heartbeat_s)

    # -- the timing wheel: heartbeats, auth deadlines; the once-a-second tick ---------------

    def _check_conn(self, conn: Connection, now: float) -> float | None:
        s = self.s
        if conn.closed:
            return None
        if not conn.authed:
            if now - conn.opened >= s.auth_timeout_s:
                self.refuse(conn, P.UNAUTHORIZED, "no hello in time", P.CLOSE_UNAUTHORIZED)
                return None
            return s.auth_timeout_s - (now - conn.opened)
        silent = now - conn.last_seen
        if (conn.ping_sent is not None and now - conn.ping_sent >= s.heartbeat_timeout_s
                and silent >= s.heartbeat_s + s.heartbeat_timeout_s - 1e-6):
            conn.abort(P.CLOSE_IDLE, "heartbeat timeout")
            return None
        if silent >= s.heartbeat_s:
            if conn.ping_sent is None:
                conn.ping()
            return s.heartbeat_timeout_s
        return s.heartbeat_s - silent

    async def _tick(self, now: float) -> None:
        self._since_tick += self.wheel.tick_s
        if self._since_tick >= 1.0:
            self._since_tick = 0.0
            for counter in self.window_counters:
                counter.sweep()
            await self._on_tick()

    # -- frames of both kinds -----------------------------------------------------------------

    async def typing(self, conn: Connection, frame: dict[str, Any]) -> None:
        """Forwarded at most once per TYPING_INTERVAL_S per socket and conversation: inside
        the interval a repeat of the state last forwarded is dropped, and a change waits for
        the interval's end (only the latest state goes out then, even if it was taken back),
        so the last state sent always arrives, at most TYPING_INTERVAL_S late."""
        c = self.desks[conn.kind].conversation_of(conn, frame)
        on = P.get_bool(frame, "on", True)
        now = time.monotonic()
        gate = conn.typing.get(c.id)
        if gate is None:
            if len(conn.typing) >= 16:     # forget conversations with nothing pending
                for cid in [cid for cid, g in conn.typing.items() if g.timer is None]:
                    del conn.typing[cid]
            gate = conn.typing[c.id] = _TypingGate()
        if gate.timer is None and now - gate.sent_at >= TYPING_INTERVAL_S:
            gate.sent_at, gate.state = now, on
            self._forward_typing(conn, c, on)
        elif gate.timer is None and on == gate.state:    # a repeat inside the interval
            return
        else:
            # A change, or a change taken back: the latest state goes out at the interval's
            # end even when it repeats the last one sent (a receiver hides the indicator when
            # a message arrives, so "on" after "off" must be said again).
            gate.pending = on
            if gate.timer is None:
                gate.timer = asyncio.get_running_loop().call_later(
                    gate.sent_at + TYPING_INTERVAL_S - now, self._typing_due, conn, c, gate)

    def _typing_due(self, conn: Connection, c: ConvState, gate: "_TypingGate") -> None:
        gate.timer = None
        if conn.closed or c.id not in conn.conversations:
            return
        gate.sent_at, gate.state = time.monotonic(), gate.pending
        try:
            self._forward_typing(conn, c, gate.state)
        except Exception:
            log.exception("typing from %r failed", conn)

    def _forward_typing(self, conn: Connection, c: ConvState, on: bool) -> None:
        self.hub.typing(c, conn.kind, conn.agent_id or conn.visitor_id or "", on, exclude=conn)

    async def read(self, conn: Connection, frame: dict[str, Any]) -> None:
        c = self.desks[conn.kind].conversation_of(conn, frame)
        self.hub.read(c, conn.kind, P.get_int(frame, "seq"), exclude=conn)

    async def sync(self, conn: Connection, frame: dict[str, Any]) -> None:
        c = self.desks[conn.kind].conversation_of(conn, frame)
        last_seq = P.get_int(frame, "last_seq", required=False, default=0) or 0
        conn.seen[c.id] = min(conn.seen.get(c.id, 0), last_seq)
        await self.hub.subscribe(conn, c, last_seq)

    async def ping(self, conn: Connection, frame: dict[str, Any]) -> None:
        conn.send({"type": "pong"})
