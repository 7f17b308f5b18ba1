"""The one way kefu opens Redis (redis-py's asyncio client, the maintained successor of aioredis).

Every seam that shares state between workers and nodes (the broker, routing state, session
memory, per-IP limits, metrics) gets its client here, with the same options: short connect and
command timeouts, so a lost Redis makes a call fail in about a second instead of hanging a
request, and keys under one prefix (``server.redis_prefix``), so several deployments (or test
runs) can share one Redis.  kefu needs a standalone Redis (or a primary), not Redis Cluster:
its Lua scripts touch keys they build from the prefix.
"""
from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from engine import ConfigError

#: Seconds to connect and to wait for one command's answer.
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
#: Connections one worker keeps to Redis at most (plus the broker's subscription).
MAX_CONNECTIONS = 64


class RedisUnreachable(ConfigError):
    """``server.redis_url`` is set but no Redis answers there at start-up."""

    code = "redis_unreachable"


def client(url: str, *, command_timeout: float | None = COMMAND_TIMEOUT_S) -> aioredis.Redis:
    """A connection pool to ``url`` (``redis://host:6379/0``, ``rediss://`` for TLS,
    ``unix:///path``).  Nothing is connected until the first command."""
    # A *blocking* pool of MAX_CONNECTIONS: a burst (hundreds of upgrades at once, each
    # counting its IP) waits a moment for a connection instead of failing with "Too many
    # connections", as redis-py's default pool (100, then an error) does.
    # RESP2 on purpose: redis-py 8 speaks RESP3 by default, where pub/sub replies are push
    # frames that ``read_response`` hands to a push handler instead of returning them, so the
    # broker's own subscription loop (server.redis_broker) would never see a message.  RESP2
    # also works with every Redis kefu supports and every redis-py from 5 on.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=command_timeout or COMMAND_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=command_timeout, health_check_interval=0,
        decode_responses=False, protocol=2)
    return aioredis.Redis.from_pool(pool)


async def open_checked(url: str) -> aioredis.Redis:
    """A client whose Redis answered PING: at start-up a wrong URL or a stopped Redis is a
    clear error naming the setting, not a server that fails on its first handoff."""
    redis = client(url)
    try:
        await redis.ping()
    except (RedisError, OSError) as exc:
        await redis.aclose()
        raise RedisUnreachable(f"server.redis_url: no Redis answers at {redact(url)} ({exc}); "
                               "start Redis or fix the URL (KEFU_SERVER_REDIS_URL)") from None
    return redis


def workers_key(prefix: str) -> str:
    """The live workers' presence (sorted set: worker id -> expiry), written by routing
    (``RedisRoutingState``) and read by the per-IP socket cap and /metrics: one name for all."""
    return prefix + "r:workers"


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


@dataclass(frozen=True)
class WorkerIdentity:
    """Who this process is among every worker of every node sharing one Redis.

    ``node`` names the machine (``server.node_id``, default hostname:port), ``index`` the
    worker on it (0 for a single process), and ``id`` this run of it: a restarted worker is a
    new ``id``, so what a dead one left in Redis (socket counts, presence) never counts as its
    successor's."""

    node: str
    index: int
    id: str

    @classmethod
    def make(cls, node_id: str, port: int, index: int = 0) -> "WorkerIdentity":
        node = node_id or f"{socket.gethostname()}:{port}"
        return cls(node=node, index=index, id=f"{node}/{index}/{secrets.token_hex(4)}")
