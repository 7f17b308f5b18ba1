"""The broker between workers and nodes, on Redis pub/sub (see :mod:`server.broker` for the
contract).

Why pub/sub and not Streams: the database already keeps every message with its seq, and
clients (and the hub) recover by seq, so the broker only needs to be fast, not durable.  A
stream per conversation would store every message a second time, need trimming, and still
need the seq check for frames from the database.  Pub/sub is at most once; the hub repairs a
gap from the database as soon as it sees one (a seq that skips ahead) and for every subscribed
conversation after an outage.

One channel per topic, ``<prefix>b:<topic>``: a worker subscribes to the conversations, agents
and teams its own sockets need, so each frame goes only to workers that want it.  Payloads
are JSON ``{"o": <worker id>, "p": <frame or command>}``; a worker ignores its own (it has
delivered them already).

Connections: one dedicated connection for the subscription (read by one task, with a PING
every ``ping_s`` so a silent cut is noticed), and the ordinary client pool for PUBLISH,
pipelined in batches by one task (publish order kept).  When the subscription connection
fails, the broker retries every ``retry_s`` (0.5 s), re-subscribes to everything it wants,
and calls ``on_recovered``: so it is back within a second of Redis returning.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from typing import Any

from redis.exceptions import RedisError

from .broker import Broker
from .metrics import Metrics
from .tasks import stop_tasks

log = logging.getLogger("kefu.broker")

_CHUNK = 500          # channels per SUBSCRIBE command when re-subscribing
_BATCH = 1000         # PUBLISHes per pipeline


class RedisBroker(Broker):
    def __init__(self, redis: Any, *, prefix: str, worker_id: str, metrics: Metrics,
                 ping_s: float = 1.0, retry_s: float = 0.5, subscribe_timeout_s: float = 3.0) -> None:
        super().__init__()
        self._redis, self._prefix, self.worker_id, self._metrics = redis, prefix + "b:", worker_id, metrics
        self._origin = worker_id
        self.ping_s, self.retry_s, self.subscribe_timeout_s = ping_s, retry_s, subscribe_timeout_s
        self._wanted: set[str] = set()
        self._confirm: dict[bytes, list[asyncio.Future]] = {}
        self._conn: Any = None
        self._connected = asyncio.Event()
        self._out: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._out_ready = asyncio.Event()
        self._sending = 0     # PUBLISHes popped from _out and not yet answered
        self._commands: collections.deque[tuple[str, list[bytes]]] = collections.deque()
        self._commands_ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self.outages = 0
        self.last_error = ""
        self._down_since: float | None = None

    # -- lifecycle
    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._subscriber(), name="kefu-broker-subscriber"),
                       asyncio.create_task(self._publisher(), name="kefu-broker-publisher"),
                       asyncio.create_task(self._commander(), name="kefu-broker-commands")]
        try:
            await asyncio.wait_for(self._connected.wait(), 5.0)
        except asyncio.TimeoutError:
            log.warning("broker: no Redis subscription yet (%s); retrying in the background", self.last_error)

    async def close(self) -> None:
        self._closing = True
        if self._out:
            self._out_ready.set()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 1.0
            while (self._out or self._sending) and loop.time() < deadline and self._connected.is_set():
                await asyncio.sleep(0.01)
        await stop_tasks(self._tasks)      # (a PING to a quiet subscription may swallow one cancel)
        await self._drop_connection()

    def status(self) -> dict[str, Any]:
        return {"broker": "redis", "connected": self._connected.is_set(), "outages": self.outages,
                "subscriptions": len(self._wanted), "queued": len(self._out),
                **({"error": self.last_error} if not self._connected.is_set() and self.last_error else {})}

    # -- the seam
    def publish(self, topic: str, payload: dict[str, Any], exclude: Any = None) -> None:
        self.deliver_here(topic, payload, exclude)
        if self._closing and not self._connected.is_set():
            return
        try:
            data = json.dumps({"o": self._origin, "p": payload}, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError):
            # (a bug upstream: every frame kefu publishes is JSON) never the caller's failure
            self._metrics.inc("kefu_broker_dropped_total")
            log.error("broker: a frame on %s is not JSON; delivered here only", topic, exc_info=True)
            return
        self._out.append((self._channel(topic), data.encode()))
        if len(self._out) == 1:
            self._out_ready.set()

    async def subscribe(self, topic: str) -> None:
        if topic in self._wanted:
            return
        self._wanted.add(topic)
        if not self._connected.is_set():
            return        # re-subscribed with the rest when the connection is back (then recovered)
        fut = asyncio.get_running_loop().create_future()
        self._confirm.setdefault(self._channel(topic), []).append(fut)
        self._command("SUBSCRIBE", [self._channel(topic)])
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.subscribe_timeout_s)
        except asyncio.TimeoutError:
            log.warning("broker: subscription to %s not confirmed in %.0f s", topic, self.subscribe_timeout_s)

    def unsubscribe(self, topic: str) -> None:
        if topic not in self._wanted:
            return
        self._wanted.discard(topic)
        if self._connected.is_set():
            self._command("UNSUBSCRIBE", [self._channel(topic)])

    # -- internals
    def _channel(self, topic: str) -> bytes:
        return (self._prefix + topic).encode()

    def _command(self, name: str, args: list[bytes]) -> None:
        self._commands.append((name, args))
        self._commands_ready.set()

    async def _commander(self) -> None:
        """Subscription commands, one at a time in order (an unsubscribe never overtakes the
        subscribe before it)."""
        while True:
            await self._commands_ready.wait()
            self._commands_ready.clear()
            while self._commands:
                name, args = self._commands.popleft()
                conn = self._conn
                if conn is None:
                    continue          # lost: the reconnect re-subscribes from _wanted
                try:
                    await conn.send_command(name, *args, check_health=False)
                except (RedisError, OSError) as exc:
                    log.debug("broker: %s failed: %s", name, exc)

    async def _subscriber(self) -> None:
        delay = 0.0
        while True:
            await asyncio.sleep(delay)
            delay = self.retry_s
            try:
                await self._connect_and_read()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, asyncio.TimeoutError, ConnectionError) as exc:
                self._lost(exc)
            except Exception as exc:      # a bug must not stop fan-out for good
                log.exception("broker: subscriber failed")
                self._lost(exc)

    def _lost(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self._connected.is_set():
            self._connected.clear()
            self._down_since = time.monotonic()
            self.outages += 1
            self._metrics.inc("kefu_broker_outages_total")
            log.warning("broker: lost the Redis subscription (%s); reconnecting", self.last_error)
        for futs in self._confirm.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)
        self._confirm.clear()
        self._conn = None

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.disconnect(nowait=True)
            except Exception:
                pass

    async def _connect_and_read(self) -> None:
        pool = self._redis.connection_pool
        conn = pool.make_connection()
        try:
            await conn.connect()
            wanted = sorted(self._wanted)
            pending = 0
            for i in range(0, len(wanted), _CHUNK):
                chunk = [self._channel(t) for t in wanted[i:i + _CHUNK]]
                await conn.send_command("SUBSCRIBE", *chunk, check_health=False)
                pending += len(chunk)
            subscribed = set(wanted)
            recovering = self._down_since is not None
            if not pending:
                self._up(conn, recovering, subscribed)
            awaiting_pong = False
            while True:
                resp = await conn.read_response(timeout=self.ping_s)
                if resp is None:                  # quiet for ping_s: is it still there?
                    if awaiting_pong:
                        raise ConnectionError(f"no answer to PING within {self.ping_s:.1f} s")
                    await conn.send_command("PING", check_health=False)
                    awaiting_pong = True
                    continue
                awaiting_pong = False
                kind = resp[0]
                if kind == b"message":
                    self._received(resp[1], resp[2])
                elif kind == b"subscribe":
                    for fut in self._confirm.pop(resp[1], ()):
                        if not fut.done():
                            fut.set_result(None)
                    if pending:
                        pending -= 1
                        if not pending:
                            self._up(conn, recovering, subscribed)
        finally:
            if self._conn is conn:
                self._conn = None
            try:
                await conn.disconnect(nowait=True)
            except Exception:
                pass

    def _up(self, conn: Any, recovering: bool, subscribed: set[str]) -> None:
        self._conn = conn
        self._connected.set()
        # Topics (un)subscribed while the re-subscribe was on its way: their subscribe() returned
        # at once, counting on it.  Sent now, ahead of any later command; on_recovered waits for
        # them to be in effect.
        late = [self._channel(t) for t in sorted(self._wanted - subscribed)]
        gone = [self._channel(t) for t in sorted(subscribed - self._wanted)]
        confirms: list[asyncio.Future] = []
        for channel in late:
            confirms.append(asyncio.get_running_loop().create_future())
            self._confirm.setdefault(channel, []).append(confirms[-1])
        for i in range(0, len(late), _CHUNK):
            self._command("SUBSCRIBE", late[i:i + _CHUNK])
        if gone:
            self._command("UNSUBSCRIBE", gone)
        if recovering:
            down = time.monotonic() - (self._down_since or time.monotonic())
            self._down_since = None
            log.warning("broker: Redis subscription back after %.1f s (%d topics); repairing by seq",
                        down, len(self._wanted))
            if self.on_recovered is not None:
                asyncio.create_task(self._recovered(confirms), name="kefu-broker-recovered")
        self._out_ready.set()

    async def _recovered(self, confirms: list[asyncio.Future]) -> None:
        try:
            if confirms:
                await asyncio.wait(confirms, timeout=self.subscribe_timeout_s)
            await self.on_recovered()   # type: ignore[misc]
        except Exception:
            log.exception("broker: recovery after the outage failed")

    def _received(self, channel: bytes, data: bytes) -> None:
        try:
            envelope = json.loads(data)
            if envelope.get("o") == self._origin:
                return                        # ours: delivered here when published
            topic = channel.decode()[len(self._prefix):]
            payload = envelope["p"]
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("broker: unreadable payload on %r", channel[:80])
            return
        self._metrics.inc("kefu_broker_received_total")
        try:
            self.deliver_here(topic, payload, None)
        except Exception:
            log.exception("broker: delivering a frame on %s failed", topic)

    async def _publisher(self) -> None:
        while True:
            await self._out_ready.wait()
            self._out_ready.clear()
            while self._out:
                if not self._connected.is_set():
                    # Redis is away: what is queued now would be stale by the time it is back
                    # (the database has it; the hub repairs by seq after the reconnect).
                    dropped = len(self._out)
                    self._out.clear()
                    self._metrics.inc("kefu_broker_dropped_total", dropped)
                    break
                batch = [self._out.popleft() for _ in range(min(_BATCH, len(self._out)))]
                self._sending = len(batch)
                try:
                    pipe = self._redis.pipeline(transaction=False)
                    for channel, data in batch:
                        pipe.publish(channel, data)
                    await pipe.execute()
                    self._metrics.inc("kefu_broker_published_total", len(batch))
                except (RedisError, OSError, asyncio.TimeoutError) as exc:
                    self._metrics.inc("kefu_broker_dropped_total", len(batch))
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.debug("broker: publish failed: %s", exc)
                    await asyncio.sleep(self.retry_s / 5)
                finally:
                    self._sending = 0
