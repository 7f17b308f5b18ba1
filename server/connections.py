"""Connections, their registries, rate limits and the one timing wheel.

* :class:`Connection` - one WebSocket: a bounded send queue drained by ONE writer task
  (never two writers on a socket); a client that does not read fast enough fills the
  queue and is closed with 4008 instead of growing memory or stalling its senders.
* :class:`Registry` - this worker's sockets, O(1) by visitor, agent and conversation (the
  other workers' are reached through the broker, :mod:`server.broker`).
* :class:`TimingWheel` - one task for every connection's heartbeat, idle and auth
  deadlines (no timer per connection); it also drives the router's tick.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import defaultdict, deque
from typing import Any, Awaitable, Callable, Iterable

from . import protocol
from .tasks import stop_tasks

log = logging.getLogger("kefu.server")

_ids = itertools.count(1)
_PING = object()
_CLOSE = object()


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self, cost: float = 1.0) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class Connection:
    """One authenticated (or authenticating) WebSocket."""

    def __init__(self, ws: Any, *, kind: str, ip: str, binary: bool, queue_frames: int,
                 rate_per_s: float, rate_burst: float, on_close: Callable[["Connection", int], None]) -> None:
        self.id = next(_ids)
        self.ws = ws
        self.kind = kind                      # visitor | agent
        self.ip = ip
        self.codec = protocol.Codec(binary)
        self.visitor_id: str | None = None
        self.agent_id: str | None = None
        self.team: str | None = None          # an agent's team (from the account, at hello)
        self.topics: list[str] = []           # broker topics followed for this socket (agent, team)
        self.routed = False                   # counted among the agent's sockets by routing
        self.token_version = 0
        self.token_expires = math.inf         # an agent socket's token expiry (unix time): re-checked
        self.conversations: set[str] = set()  # subscribed conversation ids
        self.seen: dict[str, int] = {}        # highest seq delivered per conversation
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max(1, queue_frames))
        self.bucket = TokenBucket(rate_per_s, rate_burst)
        self.refusals: deque[float] = deque() # when the bucket refused frames: the latest, within the window
        self.limited = False                  # the last frame was refused (its error frame is sent)
        self.typing: dict[str, Any] = {}      # per conversation: typing forwarded and pending (sessions)
        self.errors = 0
        self.opened = self.last_seen = time.monotonic()
        self.ping_sent: float | None = None
        self.closed = False
        self.close_code: int | None = None
        self.wheel_slot: int | None = None
        self.wheel_rounds = 0
        self._on_close = on_close
        self.writer = asyncio.create_task(self._write(), name=f"kefu-writer-{self.id}")

    @property
    def authed(self) -> bool:
        return bool(self.visitor_id or self.agent_id)

    def __repr__(self) -> str:
        who = self.agent_id or self.visitor_id or "anonymous"
        return f"<Connection {self.id} {self.kind} {who}>"

    # -- sending: the only writer is self.writer -------------------------------------------

    def send(self, frame: dict[str, Any]) -> bool:
        if self.closed:
            return False
        try:
            self.queue.put_nowait(frame)
            return True
        except asyncio.QueueFull:
            self.abort(protocol.CLOSE_SLOW, "slow consumer: send queue full")
            return False

    def deliver(self, message: dict[str, Any]) -> bool:
        """Send a stored message frame unless this connection already has it (by seq)."""
        conv, seq = message["conversation"], message["seq"]
        if seq <= self.seen.get(conv, 0):
            return False
        self.seen[conv] = seq
        return self.send(message)

    def ping(self) -> None:
        self.ping_sent = time.monotonic()
        self.send(_PING)  # type: ignore[arg-type]

    def close(self, code: int = protocol.CLOSE_NORMAL, reason: str = "") -> None:
        """Close after the frames already queued (an error frame first, say)."""
        if self.closed:
            return
        try:
            self.queue.put_nowait((_CLOSE, code, reason))
        except asyncio.QueueFull:
            self.abort(code, reason)

    def abort(self, code: int, reason: str) -> None:
        """Close now, dropping whatever is queued (used when the client is not reading)."""
        if self.closed:
            return
        self.closed, self.close_code = True, code
        self.writer.cancel()
        try:
            self.ws.fail_connection(code, reason)
            if code == protocol.CLOSE_SLOW:
                # it is not reading: drop the buffered bytes now rather than after a close timeout
                transport = getattr(getattr(self.ws, "io_proto", None), "transport", None)
                if transport is not None:
                    transport.abort()
        except Exception:  # the transport may be gone already
            log.debug("fail_connection on %r", self, exc_info=True)
        self._on_close(self, code)

    def _pong(self, fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.last_seen = time.monotonic()
            self.ping_sent = None

    async def _write(self) -> None:
        ws, encode, queue = self.ws, self.codec.encode, self.queue
        try:
            while True:
                frame = await queue.get()
                if frame is _PING:
                    waiter = await ws.ping()
                    waiter.add_done_callback(self._pong)
                elif isinstance(frame, tuple) and frame[0] is _CLOSE:
                    self.closed, self.close_code = True, frame[1]
                    self._on_close(self, frame[1])
                    await ws.close(frame[1], frame[2])
                    return
                else:
                    await ws.send(encode(frame))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket closed under us: the reader sees it too
            log.debug("writer of %r stopped: %s", self, exc)
            if not self.closed:
                self.closed = True
                self._on_close(self, protocol.CLOSE_GOING_AWAY)

    async def finish(self) -> None:
        """Called by the handler on the way out: stop the writer."""
        self.closed = True
        if not self.writer.done():
            self.writer.cancel()
            try:
                await self.writer
            except (asyncio.CancelledError, Exception):
                pass


class Registry:
    """Who is connected, by visitor, agent and conversation: every lookup O(1)."""

    def __init__(self) -> None:
        self.connections: set[Connection] = set()
        self.by_visitor: dict[str, set[Connection]] = defaultdict(set)
        self.by_agent: dict[str, set[Connection]] = defaultdict(set)
        self.by_conversation: dict[str, set[Connection]] = defaultdict(set)
        self.peak = 0

    def add(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.peak = max(self.peak, len(self.connections))

    def identify(self, conn: Connection) -> None:
        if conn.visitor_id:
            self.by_visitor[conn.visitor_id].add(conn)
        if conn.agent_id:
            self.by_agent[conn.agent_id].add(conn)

    def remove(self, conn: Connection) -> list[str]:
        """Forget the connection; returns the conversations it was subscribed to."""
        if conn not in self.connections:
            return []
        self.connections.discard(conn)
        for index, key in ((self.by_visitor, conn.visitor_id), (self.by_agent, conn.agent_id)):
            if key and key in index:
                index[key].discard(conn)
                if not index[key]:
                    del index[key]
        cids = list(conn.conversations)
        for cid in cids:
            self._drop(cid, conn)
        conn.conversations.clear()
        return cids

    def subscribe(self, conn: Connection, conversation_id: str) -> None:
        conn.conversations.add(conversation_id)
        self.by_conversation[conversation_id].add(conn)

    def unsubscribe(self, conn: Connection, conversation_id: str) -> None:
        conn.conversations.discard(conversation_id)
        self._drop(conversation_id, conn)

    def _drop(self, cid: str, conn: Connection) -> None:
        subs = self.by_conversation.get(cid)
        if subs is not None:
            subs.discard(conn)
            if not subs:
                del self.by_conversation[cid]

    def agent_conns(self, agent_id: str) -> Iterable[Connection]:
        return tuple(self.by_agent.get(agent_id, ()))

    def subscribers(self, conversation_id: str) -> Iterable[Connection]:
        return tuple(self.by_conversation.get(conversation_id, ()))

    def to_conversation(self, conversation_id: str, frame: dict[str, Any], *,
                        exclude: Connection | None = None) -> int:
        """A transient frame (typing, read, state) to this worker's sockets in the conversation."""
        return sum(conn.send(frame) for conn in self.subscribers(conversation_id) if conn is not exclude)

    def to_agent(self, agent_id: str, frame: dict[str, Any]) -> int:
        """A frame to this worker's sockets of the agent."""
        return sum(conn.send(frame) for conn in self.agent_conns(agent_id))


class TimingWheel:
    """A hashed timing wheel: ``slots`` buckets of ``tick_s`` each; one task for everything."""

    def __init__(self, tick_s: float, check: Callable[[Connection, float], float | None],
                 on_tick: Callable[[float], Awaitable[None] | None], slots: int = 128) -> None:
        self.tick_s = tick_s
        self.slots: list[set[Connection]] = [set() for _ in range(slots)]
        self.cursor = 0
        self._check = check      # returns the delay until the next check, or None to stop
        self._on_tick = on_tick
        self._task: asyncio.Task | None = None

    def schedule(self, conn: Connection, delay_s: float) -> None:
        self.cancel(conn)
        ticks = max(1, math.ceil(delay_s / self.tick_s))
        slot = (self.cursor + ticks) % len(self.slots)
        conn.wheel_rounds = (ticks - 1) // len(self.slots)
        conn.wheel_slot = slot
        self.slots[slot].add(conn)

    def cancel(self, conn: Connection) -> None:
        if conn.wheel_slot is not None:
            self.slots[conn.wheel_slot].discard(conn)
            conn.wheel_slot = None

    def __len__(self) -> int:
        return sum(len(s) for s in self.slots)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kefu-timing-wheel")

    async def stop(self) -> None:
        if self._task:
            await stop_tasks([self._task])    # (its tick may be in a Redis call)
            self._task = None

    async def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += self.tick_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            now = time.monotonic()
            self.cursor = (self.cursor + 1) % len(self.slots)
            bucket = self.slots[self.cursor]
            due = [c for c in bucket if c.wheel_rounds == 0]
            for conn in bucket:
                if conn.wheel_rounds:
                    conn.wheel_rounds -= 1
            for conn in due:
                bucket.discard(conn)
                conn.wheel_slot = None
                try:
                    delay = self._check(conn, now)
                except Exception:
                    log.exception("timing wheel check failed for %r", conn)
                    delay = None
                if delay is not None and not conn.closed:
                    self.schedule(conn, delay)
            try:
                result = self._on_tick(now)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("timing wheel tick failed")
