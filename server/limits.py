"""Per-IP limits, counted for the whole deployment: in this process, or in Redis across every
worker and node.

* :class:`WindowCounter` - events per key per window (new conversations, failed logins, bot
  replies per IP).  The window starts at a key's first event and lasts ``window_s``.
* :class:`ConnectionCap` - open WebSockets per IP: :meth:`acquire` counts a socket in only if
  the IP is under the cap, in one atomic step, so a burst of upgrades on many workers at once
  cannot get past it; :meth:`release` when the socket closes.

Each has an in-process implementation (the one-process default) and a Redis one
(``redis_url`` set), with the same methods.  A worker that dies without releasing its sockets
stops counting once its presence expires (the Redis cap counts live workers only).
"""
from __future__ import annotations

import abc
import logging
import time
from typing import Any, Callable

from redis.exceptions import RedisError

from .redis_client import workers_key

log = logging.getLogger("kefu.server")


class WindowCounter(abc.ABC):
    limit: int
    window_s: float

    @abc.abstractmethod
    async def hit(self, key: str) -> bool:
        """Count one event; False when the key is over its limit (the event is refused)."""

    @abc.abstractmethod
    async def over(self, key: str) -> bool:
        """Is the key at its limit (without counting)?"""

    def sweep(self, now: float | None = None) -> None:
        """Forget keys whose window is over (the in-process one; Redis keys expire)."""


class LocalWindowCounter(WindowCounter):
    """In this process; old keys are evicted by :meth:`sweep` (the timing wheel's tick)."""

    def __init__(self, limit: int, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self._clock = int(limit), float(window_s), clock
        self._counts: dict[str, list[float | int]] = {}

    async def hit(self, key: str) -> bool:
        if self.limit <= 0:
            return True
        now = self._clock()
        entry = self._counts.get(key)
        if entry is None or now - entry[0] >= self.window_s:
            self._counts[key] = [now, 1]
            return True
        if entry[1] >= self.limit:
            return False
        entry[1] += 1
        return True

    async def over(self, key: str) -> bool:
        entry = self._counts.get(key)
        return bool(self.limit > 0 and entry and self._clock() - entry[0] < self.window_s
                    and entry[1] >= self.limit)

    def sweep(self, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        for key in [k for k, v in self._counts.items() if now - v[0] >= self.window_s]:
            del self._counts[key]

    def __len__(self) -> int:
        return len(self._counts)


# KEYS[1] the counter; ARGV: limit, window (ms).  The key's TTL is its window.
_HIT = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then return 0 end
n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


class RedisWindowCounter(WindowCounter):
    """``<prefix>w:<name>:<key>``: a counter whose TTL is the window.  Redis unreachable: the
    event is allowed (a limit is not worth refusing every visitor for) and logged."""

    def __init__(self, redis: Any, prefix: str, name: str, limit: int, window_s: float = 60.0) -> None:
        self.limit, self.window_s = int(limit), float(window_s)
        self._redis, self._base = redis, f"{prefix}w:{name}:"
        self._hit = redis.register_script(_HIT)

    async def hit(self, key: str) -> bool:
        if self.limit <= 0:
            return True
        try:
            return bool(await self._hit(keys=[self._base + key], args=[self.limit, int(self.window_s * 1000)]))
        except (RedisError, OSError) as exc:
            log.warning("rate limit %s not counted (Redis: %s)", self._base, exc)
            return True

    async def over(self, key: str) -> bool:
        if self.limit <= 0:
            return False
        try:
            return int(await self._redis.get(self._base + key) or 0) >= self.limit
        except (RedisError, OSError):
            return False


class ConnectionCap(abc.ABC):
    limit: int   # 0: no cap (tests may change it on a running server)

    @abc.abstractmethod
    async def count(self, ip: str) -> int: ...

    @abc.abstractmethod
    async def acquire(self, ip: str) -> bool:
        """Count one more socket of ``ip`` if it is under the cap; False (not counted) otherwise."""

    @abc.abstractmethod
    def release(self, ip: str) -> None:
        """One socket of ``ip`` closed (counted by :meth:`acquire`)."""

    def __len__(self) -> int:
        return 0


class LocalConnectionCap(ConnectionCap):
    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.by_ip: dict[str, int] = {}

    async def count(self, ip: str) -> int:
        return self.by_ip.get(ip, 0)

    async def acquire(self, ip: str) -> bool:
        n = self.by_ip.get(ip, 0)
        if self.limit and n >= self.limit:
            return False
        self.by_ip[ip] = n + 1
        return True

    def release(self, ip: str) -> None:
        left = self.by_ip.get(ip, 1) - 1
        if left > 0:
            self.by_ip[ip] = left
        else:
            self.by_ip.pop(ip, None)

    def __len__(self) -> int:
        return len(self.by_ip)


# KEYS[1] the IP's hash (worker id -> sockets), KEYS[2] the workers' presence (id -> expiry).
# ARGV: limit (0: none), this worker, now.  Fields of workers whose presence expired are
# dropped: a dead worker's sockets are gone with it.
_ACQUIRE = """
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local w, n = fields[i], tonumber(fields[i + 1])
  local until_ = tonumber(redis.call('ZSCORE', KEYS[2], w) or '0')
  if until_ > tonumber(ARGV[3]) or w == ARGV[2] then total = total + n
  else redis.call('HDEL', KEYS[1], w) end
end
if tonumber(ARGV[1]) > 0 and total >= tonumber(ARGV[1]) then return -1 end
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
redis.call('EXPIRE', KEYS[1], 86400)
return total + 1
"""
_RELEASE = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
"""
_COUNT = """
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local until_ = tonumber(redis.call('ZSCORE', KEYS[2], fields[i]) or '0')
  if until_ > tonumber(ARGV[1]) or fields[i] == ARGV[2] then total = total + tonumber(fields[i + 1]) end
end
return total
"""


class RedisConnectionCap(ConnectionCap):
    """``<prefix>ip:<ip>``: a hash worker id -> open sockets, summed over live workers (their
    presence is routing's ``<prefix>r:workers`` sorted set, refreshed by each worker)."""

    def __init__(self, redis: Any, prefix: str, worker_id: str, limit: int,
                 spawn: Callable[[Any, str], None], clock: Callable[[], float] = time.time) -> None:
        self.limit = int(limit)
        self._redis, self._prefix, self._worker, self._clock, self._spawn = redis, prefix, worker_id, clock, spawn
        self._workers = workers_key(prefix)
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)
        self._count = redis.register_script(_COUNT)
        self.held: dict[str, int] = {}     # what this worker counted in, to give back

    async def count(self, ip: str) -> int:
        try:
            return int(await self._count(keys=[self._prefix + "ip:" + ip, self._workers],
                                         args=[self._clock(), self._worker]))
        except (RedisError, OSError):
            return self.held.get(ip, 0)

    async def acquire(self, ip: str) -> bool:
        try:
            n = int(await self._acquire(keys=[self._prefix + "ip:" + ip, self._workers],
                                        args=[self.limit, self._worker, self._clock()]))
        except (RedisError, OSError) as exc:
            # Redis unreachable: cap this worker's own sockets only, and say so
            log.warning("per-IP socket cap counted on this worker only (Redis: %s)", exc)
            if self.limit and self.held.get(ip, 0) >= self.limit:
                return False
            n = 0
        if n < 0:
            return False
        self.held[ip] = self.held.get(ip, 0) + 1
        return True

    def release(self, ip: str) -> None:
        left = self.held.get(ip, 0) - 1
        if left > 0:
            self.held[ip] = left
        else:
            self.held.pop(ip, None)
        self._spawn(self._give_back(ip), "kefu-ip-release")

    async def _give_back(self, ip: str) -> None:
        try:
            await self._release(keys=[self._prefix + "ip:" + ip], args=[self._worker])
        except (RedisError, OSError) as exc:
            log.warning("per-IP socket count of %s not released (Redis: %s)", ip, exc)

    def __len__(self) -> int:
        return len(self.held)
