"""The context memory pool: per-session history, slots and counters.

Bounded by the number of sessions (least recently used goes first) and by age (a
session idle for ``ttl_s`` is forgotten).  Storage sits behind :class:`MemoryStore`, a
small async get/put/delete interface, so a Redis backend can replace the in-process one.
"""
from __future__ import annotations

import abc
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

#: Turns of history kept per session: enough for context, bounded for memory.
HISTORY_TURNS = 20


@dataclass
class SessionContext:
    session: str
    bot: str
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY_TURNS))
    slots: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    def remember(self, role: str, text: str, intent: str | None = None) -> None:
        self.history.append({"role": role, "text": text, "intent": intent})

    def to_dict(self) -> dict[str, Any]:
        return {"session": self.session, "bot": self.bot, "history": list(self.history),
                "slots": dict(self.slots), "counters": dict(self.counters)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SessionContext":
        ctx = cls(session=data["session"], bot=data["bot"])
        ctx.history.extend(data.get("history", ()))
        ctx.slots.update(data.get("slots", {}))
        ctx.counters.update(data.get("counters", {}))
        return ctx


class MemoryStore(abc.ABC):
    """Where session contexts live between turns."""

    @abc.abstractmethod
    async def get(self, bot: str, session: str) -> SessionContext | None: ...

    @abc.abstractmethod
    async def put(self, context: SessionContext) -> None: ...

    @abc.abstractmethod
    async def delete(self, bot: str, session: str) -> None: ...

    async def load(self, bot: str, session: str) -> SessionContext:
        return await self.get(bot, session) or SessionContext(session=session, bot=bot)

    async def close(self) -> None:
        """Release connections; the in-process store holds none."""


class InMemoryStore(MemoryStore):
    """An LRU of sessions with a time-to-live, in this process."""

    def __init__(self, max_sessions: int = 100_000, ttl_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_sessions < 1 or ttl_s <= 0:
            raise ValueError("max_sessions must be >= 1 and ttl_s > 0")
        self.max_sessions, self.ttl_s, self._clock = max_sessions, ttl_s, clock
        self._items: OrderedDict[tuple[str, str], tuple[float, SessionContext]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self) -> None:
        # Oldest first (LRU order is also last-touch order), so stop at the first live one.
        cutoff = self._clock() - self.ttl_s
        while self._items:
            key, (touched, _) = next(iter(self._items.items()))
            if touched > cutoff:
                break
            del self._items[key]

    async def get(self, bot: str, session: str) -> SessionContext | None:
        self._expire()
        item = self._items.get((bot, session))
        if item is None:
            return None
        self._items.move_to_end((bot, session))
        self._items[(bot, session)] = (self._clock(), item[1])
        return item[1]

    async def put(self, context: SessionContext) -> None:
        key = (context.bot, context.session)
        self._items[key] = (self._clock(), context)
        self._items.move_to_end(key)
        self._expire()
        while len(self._items) > self.max_sessions:
            self._items.popitem(last=False)

    async def delete(self, bot: str, session: str) -> None:
        self._items.pop((bot, session), None)
