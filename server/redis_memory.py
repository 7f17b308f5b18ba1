"""The engine's session memory on Redis, so a visitor's context (history, slots, counters)
survives their next message landing on another worker or node.

``<prefix>m:<bot>:<session>``: the context as JSON, expiring ``ttl_s`` after its last use
(the engine's ``memory_ttl_s``), as the in-process store forgets an idle session.  Redis
unreachable: the turn goes on with a fresh context (a bot that forgets a slot is better than
no answer) and the failure is logged.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from redis.exceptions import RedisError

from engine import MemoryStore, SessionContext

log = logging.getLogger("kefu.server")


class RedisMemoryStore(MemoryStore):
    def __init__(self, redis: Any, *, prefix: str, ttl_s: float) -> None:
        self._redis, self._base, self.ttl_ms = redis, prefix + "m:", max(1, int(ttl_s * 1000))

    def _key(self, bot: str, session: str) -> str:
        return f"{self._base}{bot}:{session}"

    async def get(self, bot: str, session: str) -> SessionContext | None:
        try:
            raw = await self._redis.execute_command("GETEX", self._key(bot, session), "PX", self.ttl_ms)
        except (RedisError, OSError) as exc:
            log.warning("session memory unavailable (Redis: %s); this turn starts fresh", exc)
            return None
        if raw is None:
            return None
        try:
            return SessionContext.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError):
            log.warning("session memory of %s/%s unreadable; starting fresh", bot, session)
            return None

    async def put(self, context: SessionContext) -> None:
        data = json.dumps(context.to_dict(), ensure_ascii=False, separators=(",", ":"))
        try:
            await self._redis.set(self._key(context.bot, context.session), data, px=self.ttl_ms)
        except (RedisError, OSError) as exc:
            log.warning("session memory not saved (Redis: %s)", exc)

    async def delete(self, bot: str, session: str) -> None:
        try:
            await self._redis.delete(self._key(bot, session))
        except (RedisError, OSError) as exc:
            log.warning("session memory not deleted (Redis: %s)", exc)
