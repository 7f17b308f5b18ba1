"""Routing: least-loaded assignment of conversations to human agents.

A library the server calls from its WebSocket handlers and its timing wheel.

* A new human conversation goes to the online (not away) agent with the fewest open
  conversations under their capacity; equal load goes to the agent who least recently got
  one (a round-robin counter).  Nobody free: it is queued in arrival order (FIFO) and offered
  as agents free up (release, transfer away, capacity raised, agent comes online or back
  from away).  Teams: a conversation belongs to its bot's team (``bot_teams``; else
  "default") and is only ever assigned, queued and offered within it; ``accept`` by, and
  ``transfer`` to, an agent of another team raise :class:`RoutingError` ("forbidden").
  Nobody online: :class:`Unavailable` ("no_agents_online"); outside business
  hours: :class:`Unavailable` ("outside_business_hours").
* An agent whose last socket closes keeps their conversations for ``grace_s`` seconds
  (measured on the ``clock`` argument); :meth:`Router.tick` then re-queues them (state back to
  ``queued`` by compare-and-set on that agent) and offers them to others.
* The database is the source of truth for ownership.  Every assignment is a compare-and-set
  through :meth:`Storage.transition`; only the winner's result counts, and a loser (a second
  router over the same database) updates its own view from the stored row.  So one
  conversation is never assigned twice, even by concurrent routers.
* Shared state (presence, capacity, load, the queue) lives behind :class:`RoutingState`.
  Slots are *reserved* atomically in the state before the compare-and-set and committed or
  cancelled after it, so no lock is ever held across an await.

Notifications: ``notify`` is awaited for every :class:`Assigned` this router makes (from
:meth:`Router.request_human`, the queue, :meth:`Router.accept`, :meth:`Router.transfer`) and
for every :class:`Queued` produced by a grace-period expiry (the visitor's agent left).
:class:`Queued` and :class:`Unavailable` answers to :meth:`Router.request_human` are only
returned, never notified.  A router that lost a race returns the winner's assignment
without notifying (the winner did).
"""
from __future__ import annotations

import abc
import asyncio
import bisect
import functools
import heapq
import itertools
import logging
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Mapping, Sequence, Union
from zoneinfo import ZoneInfo

from server.storage.base import BOT, CLOSED, HUMAN, QUEUED, Conversation, Storage
from server.storage.detached import run_to_end, wait_all

log = logging.getLogger(__name__)

ONLINE, AWAY = "online", "away"
DEFAULT_TEAM = "default"
PRESENCES = (ONLINE, AWAY)
TEAM_CACHE_SIZE = 10_000   # conversations whose team Router.team_of keeps in memory


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Assigned:
    conversation_id: str
    agent_id: str
    previous_agent: str | None = None


@dataclass(frozen=True)
class Queued:
    conversation_id: str
    position: int              # 1-based
    previous_agent: str | None = None   # set when re-queued after that agent's grace expired


@dataclass(frozen=True)
class Unavailable:
    conversation_id: str
    reason: str                # "no_agents_online" | "outside_business_hours"


Event = Union[Assigned, Queued, Unavailable]


class RoutingError(Exception):
    """A refused routing action.  ``code`` is one of: ``agent_unavailable`` (agent not
    connected, or away, as a transfer target), ``agent_full`` (at capacity), ``not_owner``,
    ``not_found``, ``closed``, ``already_assigned``, ``not_queued``, ``invalid``,
    ``forbidden`` (the agent is not in the conversation's team)."""

    def __init__(self, code: str, message: str = ""):
        super().__init__(message or code)
        self.code = code


# --------------------------------------------------------------------------- business hours
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RANGE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def _minutes(h: str, m: str, *, end: bool) -> int:
    hh, mm = int(h), int(m)
    if mm > 59 or hh > 24 or (hh == 24 and (mm or not end)):
        raise ValueError(f"bad time {h}:{m}")
    return hh * 60 + mm


class BusinessHours:
    """Opening hours in one time zone.

    ``days`` maps a weekday (``mon`` .. ``sun``, or a full English name) to ``"HH:MM-HH:MM"``,
    several ranges separated by commas, or a list of them.  An empty mapping means always
    open; otherwise a day that is missing or empty is closed.  ``24:00`` is allowed as an end,
    and a range whose end is not after its start runs past midnight into the next day
    (``"22:00-02:00"``).  Start is inclusive, end exclusive.
    """

    def __init__(self, tz: str = "UTC", days: Mapping[str, str | Sequence[str]] | None = None):
        self.tz = ZoneInfo(tz)
        self.tz_name = tz
        self.ranges: dict[int, list[tuple[int, int]]] = {}
        for day, spec in (days or {}).items():
            key = str(day).strip().lower()[:3]
            if key not in _DAYS:
                raise ValueError(f"unknown weekday {day!r}")
            parts = [spec] if isinstance(spec, str) else list(spec)
            out: list[tuple[int, int]] = []
            for part in parts:
                for piece in str(part).split(","):
                    if not piece.strip():
                        continue
                    m = _RANGE.match(piece)
                    if not m:
                        raise ValueError(f"bad range {piece!r} for {day}: want HH:MM-HH:MM")
                    out.append((_minutes(m[1], m[2], end=False), _minutes(m[3], m[4], end=True)))
            self.ranges.setdefault(_DAYS.index(key), []).extend(out)
        self.always_open = not days

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "BusinessHours | None":
        """``{"timezone": "Europe/Berlin", "hours": {"mon": "09:00-17:00", ...}}``; the day
        keys may also sit at the top level.  None or an empty mapping: always open (None)."""
        if not cfg:
            return None
        cfg = dict(cfg)
        tz = cfg.pop("timezone", None) or cfg.pop("tz", None) or "UTC"
        days = cfg.pop("hours", None) or cfg.pop("days", None) or {}
        days = {**days, **{k: v for k, v in cfg.items() if str(k).lower()[:3] in _DAYS}}
        return cls(tz, days)

    def is_open(self, now: datetime) -> bool:
        if self.always_open:
            return True
        if now.tzinfo is None:
            now = now.replace(tzinfo=timezone.utc)
        local = now.astimezone(self.tz)
        minute = local.hour * 60 + local.minute
        today = local.weekday()
        for start, end in self.ranges.get(today, ()):
            if end > start and start <= minute < end:
                return True
            if end <= start and minute >= start:          # overnight range, evening part
                return True
        for start, end in self.ranges.get((today - 1) % 7, ()):
            if end <= start and minute < end:             # yesterday's overnight range
                return True
        return False

    def __repr__(self) -> str:
        return f"BusinessHours({self.tz_name!r}, {self.ranges!r})"


# --------------------------------------------------------------------------- state
@dataclass(frozen=True)
class AgentInfo:
    """A snapshot of one agent as routing sees it."""
    agent_id: str
    status: str                 # online | away
    sockets: int                # open sockets (tabs); 0 while in the grace period
    capacity: int
    load: int                   # open conversations (+ slots reserved for assignments in flight)
    grace_deadline: float | None = None   # set while disconnected and holding conversations
    team: str = DEFAULT_TEAM


class RoutingState(abc.ABC):
    """Presence, capacity, load and the queue.  Every mutating method is atomic.

    The assignment protocol: :meth:`reserve` (or :meth:`reserve_agent`) takes one slot from an
    eligible agent, the router then does the compare-and-set in the database, then calls
    :meth:`commit` (slot becomes a conversation) or :meth:`cancel` (slot given back).  An
    agent is *eligible* when connected (sockets > 0), ``online`` and ``load < capacity``.

    Agents and queued conversations each belong to a team (``connect``/``enqueue``): a slot
    is only ever reserved from, and the queue only offered to, agents of the same team.

    A Redis backend maps this onto: a hash per agent (status, sockets, capacity, deadline,
    team), per team a sorted set of eligible agents scored ``load * 2**32 + last_assigned`` (ZPOPMIN + re-add in
    one Lua script for :meth:`reserve`), a set of conversations per agent, a sorted set for
    the queue scored by arrival, and INCR counters.  The ``snapshot`` methods (``load``,
    ``queue_ids``, ``agents``) are synchronous: such a backend serves them from a local cache.
    """

    # -- agents
    @abc.abstractmethod
    async def connect(self, agent_id: str, capacity: int, team: str = DEFAULT_TEAM) -> AgentInfo:
        """One more socket; sets capacity and team; clears any grace deadline."""

    @abc.abstractmethod
    async def disconnect(self, agent_id: str, deadline: float) -> AgentInfo | None:
        """One socket fewer; when none are left the agent holds its conversations until
        ``deadline``.  None for an unknown agent."""

    @abc.abstractmethod
    async def set_status(self, agent_id: str, status: str) -> AgentInfo | None: ...

    @abc.abstractmethod
    async def set_capacity(self, agent_id: str, capacity: int) -> AgentInfo | None: ...

    @abc.abstractmethod
    async def expire(self, now: float) -> list[tuple[str, list[str]]]:
        """Remove agents whose grace deadline passed (no socket came back); return each with
        the conversations it held (which are unbound)."""

    @abc.abstractmethod
    async def hold(self, agent_id: str, deadline: float, capacity: int = 0) -> None:
        """Make sure an agent entry exists (not connected, holding until ``deadline`` unless
        it is connected already); used by restore."""

    # -- slots
    @abc.abstractmethod
    async def reserve(self, team: str = DEFAULT_TEAM) -> str | None:
        """Atomically take one slot from the least-loaded eligible agent of ``team`` (ties:
        least recently assigned) and return it, or None when nobody there is free."""

    @abc.abstractmethod
    async def reserve_agent(self, agent_id: str, *, allow_away: bool = False) -> str | None:
        """Take one slot from this agent: None on success, else the refusal code
        (``agent_unavailable`` or ``agent_full``)."""

    @abc.abstractmethod
    async def commit(self, conversation_id: str, agent_id: str) -> None:
        """A reserved slot of ``agent_id`` now holds ``conversation_id``."""

    @abc.abstractmethod
    async def cancel(self, agent_id: str) -> None:
        """Give a reserved slot back."""

    @abc.abstractmethod
    async def adopt(self, conversation_id: str, agent_id: str) -> bool:
        """Record an ownership learnt from the database (no reservation, may exceed capacity).
        Only for agents this state knows; False (nothing recorded) otherwise."""

    @abc.abstractmethod
    async def unbind(self, conversation_id: str) -> str | None:
        """Forget the conversation's owner; return who it was."""

    @abc.abstractmethod
    async def owner(self, conversation_id: str) -> str | None: ...

    @abc.abstractmethod
    async def any_online(self, team: str | None = None) -> bool:
        """Is any agent (of ``team``, when given) connected and online (not away)?"""

    # -- queue
    @abc.abstractmethod
    async def enqueue(self, conversation_id: str, score: float, team: str = DEFAULT_TEAM) -> bool:
        """Add (or keep) a conversation in ``team``'s queue, ordered by ``score`` then arrival.
        A conversation with an owner is never queued (False): binding one (commit, adopt)
        also takes it out of the queue, so whichever of two racing routers comes last, a
        conversation is either owned or queued, never both."""

    @abc.abstractmethod
    async def dequeue(self, conversation_id: str) -> bool: ...

    @abc.abstractmethod
    async def queue_size(self, team: str | None = None) -> int:
        """Queued conversations (of ``team``, when given)."""

    @abc.abstractmethod
    async def pop_queue(self, team: str = DEFAULT_TEAM) -> tuple[str, float] | None:
        """Remove and return the head of ``team``'s queue with its score."""

    @abc.abstractmethod
    async def position(self, conversation_id: str) -> int | None:
        """1-based position in its team's queue, None when not queued."""

    @abc.abstractmethod
    async def queue_teams(self) -> list[str]:
        """The teams with conversations queued, in order of their heads' arrival."""

    # -- snapshots (synchronous; may be a local cache in a distributed backend)
    @abc.abstractmethod
    def load(self, agent_id: str) -> int: ...

    @abc.abstractmethod
    def queue_ids(self, team: str | None = None) -> list[str]: ...

    @abc.abstractmethod
    def team(self, agent_id: str) -> str | None:
        """The team of an agent this state knows (given at :meth:`connect`), else None."""

    @abc.abstractmethod
    def agents(self) -> list[AgentInfo]: ...


@dataclass
class _Agent:
    agent_id: str
    capacity: int
    status: str = ONLINE
    sockets: int = 0
    conversations: dict[str, None] = field(default_factory=dict)   # oldest first
    pending: int = 0
    last_assigned: int = 0
    deadline: float | None = None
    version: int = 0
    team: str = DEFAULT_TEAM

    @property
    def load(self) -> int:
        return len(self.conversations) + self.pending

    @property
    def eligible(self) -> bool:
        return self.sockets > 0 and self.status == ONLINE and self.load < self.capacity

    def info(self) -> AgentInfo:
        return AgentInfo(self.agent_id, self.status, self.sockets, self.capacity, self.load,
                         self.deadline, self.team)


class InMemoryRoutingState(RoutingState):
    """One process.  Eligible agents sit in one min-heap per team keyed by (load, last
    assigned, agent id); every change pushes a fresh entry and stale ones are skipped on pop
    (lazy deletion, compacted when a heap grows past a few times the number of agents).
    The queue is one sorted list per team (score, then arrival), so size, position and pop
    look at one team's entries only."""

    def __init__(self) -> None:
        self._agents: dict[str, _Agent] = {}
        self._owner: dict[str, str] = {}
        self._heaps: dict[str, list[tuple[int, int, str, int]]] = {}   # team -> eligible agents
        self._rr = itertools.count(1)
        self._versions = itertools.count(1)
        self._arrivals = itertools.count()
        self._queues: dict[str, list[tuple[float, int, str]]] = {}   # team -> sorted entries
        self._queued: dict[str, tuple[tuple[float, int, str], str]] = {}  # conversation -> (entry, team)

    # -- helpers
    def _touch(self, a: _Agent) -> None:
        a.version = next(self._versions)
        if a.eligible:
            heap = self._heaps.setdefault(a.team, [])
            heapq.heappush(heap, (a.load, a.last_assigned, a.agent_id, a.version))
            if len(heap) > 4 * len(self._agents) + 32:
                heap[:] = [(x.load, x.last_assigned, x.agent_id, x.version)
                           for x in self._agents.values() if x.eligible and x.team == a.team]
                heapq.heapify(heap)

    def _take(self, a: _Agent) -> None:
        a.pending += 1
        a.last_assigned = next(self._rr)
        self._touch(a)

    # -- agents
    async def connect(self, agent_id: str, capacity: int, team: str = DEFAULT_TEAM) -> AgentInfo:
        a = self._agents.get(agent_id)
        if a is None:
            a = self._agents[agent_id] = _Agent(agent_id, capacity)
        a.team = team       # a changed team: its old heap's entries go stale with the version
        a.sockets += 1
        a.capacity = capacity
        a.deadline = None
        self._touch(a)
        return a.info()

    async def disconnect(self, agent_id: str, deadline: float) -> AgentInfo | None:
        a = self._agents.get(agent_id)
        if a is None:
            return None
        a.sockets = max(0, a.sockets - 1)
        if a.sockets == 0:
            a.deadline = deadline
        self._touch(a)
        return a.info()

    async def set_status(self, agent_id: str, status: str) -> AgentInfo | None:
        a = self._agents.get(agent_id)
        if a is None:
            return None
        a.status = status
        self._touch(a)
        return a.info()

    async def set_capacity(self, agent_id: str, capacity: int) -> AgentInfo | None:
        a = self._agents.get(agent_id)
        if a is None:
            return None
        a.capacity = capacity
        self._touch(a)
        return a.info()

    async def expire(self, now: float) -> list[tuple[str, list[str]]]:
        out = []
        for a in list(self._agents.values()):
            if a.sockets == 0 and a.deadline is not None and a.deadline <= now and not a.pending:
                del self._agents[a.agent_id]
                convs = list(a.conversations)
                for c in convs:
                    self._owner.pop(c, None)
                out.append((a.agent_id, convs))
        return out

    async def hold(self, agent_id: str, deadline: float, capacity: int = 0) -> None:
        a = self._agents.get(agent_id)
        if a is None:
            a = self._agents[agent_id] = _Agent(agent_id, capacity)
        if a.sockets == 0 and a.deadline is None:
            a.deadline = deadline
        self._touch(a)

    # -- slots
    async def reserve(self, team: str = DEFAULT_TEAM) -> str | None:
        heap = self._heaps.get(team, [])
        while heap:
            load, _, agent_id, version = heapq.heappop(heap)
            a = self._agents.get(agent_id)
            if a is None or a.version != version or not a.eligible:   # stale (a team change bumps the version)
                continue
            self._take(a)
            return agent_id
        return None

    async def reserve_agent(self, agent_id: str, *, allow_away: bool = False) -> str | None:
        a = self._agents.get(agent_id)
        if a is None or a.sockets == 0 or (a.status != ONLINE and not allow_away):
            return "agent_unavailable"
        if a.load >= a.capacity:
            return "agent_full"
        self._take(a)
        return None

    async def commit(self, conversation_id: str, agent_id: str) -> None:
        a = self._agents.get(agent_id)
        if a is None:        # vanished while the write was in flight: expire at next tick
            a = self._agents[agent_id] = _Agent(agent_id, 0, deadline=float("-inf"))
        else:
            a.pending = max(0, a.pending - 1)
        self._bind(conversation_id, a)

    def _bind(self, conversation_id: str, a: _Agent) -> None:
        old = self._owner.get(conversation_id)
        if old is not None and old != a.agent_id and old in self._agents:
            prev = self._agents[old]
            prev.conversations.pop(conversation_id, None)
            self._touch(prev)
        self._owner[conversation_id] = a.agent_id
        a.conversations[conversation_id] = None
        self._unqueue(conversation_id)
        self._touch(a)

    async def cancel(self, agent_id: str) -> None:
        a = self._agents.get(agent_id)
        if a is not None and a.pending:
            a.pending -= 1
            self._touch(a)

    async def adopt(self, conversation_id: str, agent_id: str) -> bool:
        a = self._agents.get(agent_id)
        if a is None:
            await self.unbind(conversation_id)
            return False
        self._bind(conversation_id, a)
        return True

    async def unbind(self, conversation_id: str) -> str | None:
        agent_id = self._owner.pop(conversation_id, None)
        if agent_id is not None and (a := self._agents.get(agent_id)) is not None:
            a.conversations.pop(conversation_id, None)
            self._touch(a)
        return agent_id

    async def owner(self, conversation_id: str) -> str | None:
        return self._owner.get(conversation_id)

    async def any_online(self, team: str | None = None) -> bool:
        return any(a.sockets > 0 and a.status == ONLINE and (team is None or a.team == team)
                   for a in self._agents.values())

    # -- queue
    async def enqueue(self, conversation_id: str, score: float, team: str = DEFAULT_TEAM) -> bool:
        if conversation_id in self._owner:
            return False
        if conversation_id in self._queued:
            return True
        key = (score, next(self._arrivals), conversation_id)
        bisect.insort(self._queues.setdefault(team, []), key)
        self._queued[conversation_id] = (key, team)
        return True

    async def dequeue(self, conversation_id: str) -> bool:
        return self._unqueue(conversation_id)

    def _unqueue(self, conversation_id: str) -> bool:
        entry = self._queued.pop(conversation_id, None)
        if entry is None:
            return False
        key, team = entry
        queue = self._queues[team]
        del queue[bisect.bisect_left(queue, key)]
        if not queue:
            del self._queues[team]
        return True

    async def queue_size(self, team: str | None = None) -> int:
        if team is None:
            return len(self._queued)
        return len(self._queues.get(team, ()))

    async def pop_queue(self, team: str = DEFAULT_TEAM) -> tuple[str, float] | None:
        queue = self._queues.get(team)
        if not queue:
            return None
        score, _, cid = queue[0]
        self._unqueue(cid)
        return cid, score

    async def position(self, conversation_id: str) -> int | None:
        entry = self._queued.get(conversation_id)
        if entry is None:
            return None
        key, team = entry
        return 1 + bisect.bisect_left(self._queues[team], key)

    async def queue_teams(self) -> list[str]:
        """Teams with queued conversations, the team whose head entry sorts first first."""
        return [team for team, queue in sorted(self._queues.items(), key=lambda tq: tq[1][0])]

    # -- snapshots
    def load(self, agent_id: str) -> int:
        a = self._agents.get(agent_id)
        return a.load if a else 0

    def queue_ids(self, team: str | None = None) -> list[str]:
        queues = self._queues.values() if team is None else [self._queues.get(team, [])]
        return [cid for _, _, cid in heapq.merge(*queues)]

    def team(self, agent_id: str) -> str | None:
        a = self._agents.get(agent_id)
        return a.team if a else None

    def agents(self) -> list[AgentInfo]:
        return [a.info() for a in sorted(self._agents.values(), key=lambda a: a.agent_id)]


# --------------------------------------------------------------------------- router
Notify = Callable[[Event], Awaitable[None]]


def _runs_to_end(fn):
    """A routing operation that its caller's cancellation does not cut in half.

    Why: storage finishes a write whose caller was cancelled (``server.storage.sql._operation``), so a
    handoff interrupted between its stored compare-and-set and routing's own update (a
    visitor's socket closing mid-handoff cancels the handler) would leave the conversation
    stored as an agent's while the agent's load, queue and screen never learnt of it.  The
    operation runs in its own task (``run_to_end``); the caller alone is cancelled."""
    def orphan_failure(exc: BaseException) -> None:
        if not isinstance(exc, RoutingError):     # a refusal nobody waits for is no news
            log.error("routing: %s failed after its caller went away", fn.__name__, exc_info=exc)

    @functools.wraps(fn)
    async def wrapper(self: "Router", *args, **kwargs):
        return await run_to_end(fn(self, *args, **kwargs), self._running, orphan_failure=orphan_failure)
    return wrapper


class Router:
    """Least-loaded routing over a :class:`Storage` (source of truth) and a
    :class:`RoutingState` (presence, load, queue).  See the module docstring."""

    def __init__(self, storage: Storage, *, grace_s: float = 60.0,
                 business_hours: BusinessHours | None = None,
                 notify: Notify | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 state: RoutingState | None = None,
                 now: Callable[[], datetime] | None = None,
                 bot_teams: Mapping[str, str] | None = None):
        self.storage = storage
        # a conversation's team is its bot's (``[server] bot_teams``); unlisted bots: "default"
        self.bot_teams = dict(bot_teams or {})
        # conversation -> team, a bounded cache: a conversation that asks for a person and is
        # never closed (the visitor just leaves) is never released, so a plain dict would grow.
        self._teams: OrderedDict[str, str] = OrderedDict()
        self.grace_s = grace_s
        self.business_hours = business_hours
        self._notify_cb = notify
        self.clock = clock
        self.state = state if state is not None else InMemoryRoutingState()
        self._now = now or (lambda: datetime.now(timezone.utc))
        # operations whose callers may be gone, still running (see _runs_to_end)
        self._running: set[asyncio.Task] = set()
        # conversations re-queued after their agent's grace expired -> that agent
        self._previous: dict[str, str] = {}

    async def drain(self) -> None:
        """Wait for operations still running after their callers went away (at shutdown,
        before storage closes: each one finishes its stored write and routing's update)."""
        await wait_all(self._running)

    # -- teams
    def team_of_bot(self, bot: str | None) -> str:
        return self.bot_teams.get(bot or "", DEFAULT_TEAM)

    async def team_of(self, conversation_id: str) -> str:
        """The conversation's team (from its bot; cached, a conversation never changes bot)."""
        if not self.bot_teams:
            return DEFAULT_TEAM
        team = self._teams.get(conversation_id)
        if team is not None:
            self._teams.move_to_end(conversation_id)     # least recently used goes first
        else:
            conv = await self.storage.get_conversation(conversation_id)
            if conv is None:
                return DEFAULT_TEAM
            team = self._teams[conversation_id] = self.team_of_bot(conv.bot)
            if len(self._teams) > TEAM_CACHE_SIZE:
                self._teams.popitem(last=False)
        return team

    def agent_team(self, agent_id: str) -> str | None:
        """The team an agent connected with; None for an agent routing does not know."""
        return self.state.team(agent_id)

    # -- notifications
    async def _notify(self, event: Event) -> None:
        if self._notify_cb is None:
            return
        try:
            await self._notify_cb(event)
        except Exception:     # the server's problem; routing state stays consistent
            log.exception("routing notify failed for %r", event)

    # -- agents
    @_runs_to_end
    async def agent_connected(self, agent_id: str, capacity: int, team: str = DEFAULT_TEAM) -> None:
        """A socket of this agent opened (an agent may have several tabs).  Cancels a pending
        grace expiry and offers queued conversations (of the agent's team)."""
        if capacity < 0:
            raise RoutingError("invalid", "capacity must be >= 0")
        await self.state.connect(agent_id, capacity, team)
        await self._offer()

    @_runs_to_end
    async def agent_disconnected(self, agent_id: str) -> None:
        """A socket closed; when the last one goes, the grace period starts."""
        await self.state.disconnect(agent_id, self.clock() + self.grace_s)

    @_runs_to_end
    async def set_presence(self, agent_id: str, status: str) -> None:
        """``online`` or ``away`` (keeps its conversations, gets no new ones)."""
        if status not in PRESENCES:
            raise RoutingError("invalid", f"presence must be one of {PRESENCES}")
        if await self.state.set_status(agent_id, status) is None:
            raise RoutingError("agent_unavailable", f"agent {agent_id} is not connected")
        if status == ONLINE:
            await self._offer()

    @_runs_to_end
    async def set_capacity(self, agent_id: str, capacity: int) -> None:
        if capacity < 0:
            raise RoutingError("invalid", "capacity must be >= 0")
        if await self.state.set_capacity(agent_id, capacity) is None:
            raise RoutingError("agent_unavailable", f"agent {agent_id} is not connected")
        await self._offer()

    # -- conversations
    @_runs_to_end
    async def request_human(self, conversation_id: str) -> Assigned | Queued | Unavailable:
        """Route a conversation that wants a person (state bot or queued)."""
        owner = await self.state.owner(conversation_id)
        if owner is not None:                 # already with a person (as far as we know)
            return Assigned(conversation_id, owner)
        pos = await self.state.position(conversation_id)
        if pos is not None:
            return Queued(conversation_id, pos)
        if self.business_hours is not None and not self.business_hours.is_open(self._now()):
            return Unavailable(conversation_id, "outside_business_hours")
        team = await self.team_of(conversation_id)
        if not await self.state.any_online(team):
            return Unavailable(conversation_id, "no_agents_online")
        if not await self.state.queue_size(team):   # FIFO: nobody jumps an existing queue
            agent = await self.state.reserve(team)
            if agent is not None:
                return await self._assign(conversation_id, agent, (BOT, QUEUED))
        conv = await self.storage.transition(conversation_id, to_state=QUEUED, agent_id=None,
                                             from_states=(BOT, QUEUED))
        if conv is None:
            return await self._settle(conversation_id, raise_on_lost=True)
        await self.state.enqueue(conversation_id, time.time(), team)
        await self._offer()
        owner = await self.state.owner(conversation_id)
        if owner is not None:
            return Assigned(conversation_id, owner)
        pos = await self.state.position(conversation_id)
        if pos is None:                       # dropped meanwhile (closed elsewhere)
            return await self._settle(conversation_id, raise_on_lost=True)
        return Queued(conversation_id, pos)

    @_runs_to_end
    async def accept(self, conversation_id: str, agent_id: str) -> Assigned:
        """An agent takes a queued conversation by hand (if connected and under capacity;
        an agent who is away may still pick one explicitly).  Only from the agent's own team
        (else ``forbidden``)."""
        if (self.agent_team(agent_id) or DEFAULT_TEAM) != await self.team_of(conversation_id):
            raise RoutingError("forbidden", f"{conversation_id} is not in {agent_id}'s team")
        refused = await self.state.reserve_agent(agent_id, allow_away=True)
        if refused:
            raise RoutingError(refused, f"agent {agent_id}: {refused}")
        if await self._claim(conversation_id, agent_id, (QUEUED,)) is None:
            await self._give_back(agent_id)
            current = await self._settle(conversation_id, raise_on_lost=True)
            if isinstance(current, Assigned):
                raise RoutingError("already_assigned", f"{conversation_id} is with {current.agent_id}")
            raise RoutingError("not_queued", f"{conversation_id} is not queued")
        return await self._assigned(conversation_id, agent_id)

    @_runs_to_end
    async def release(self, conversation_id: str) -> None:
        """The conversation was closed or returned (the caller changed its stored state):
        free its agent's slot (or its place in the queue) and offer the queue."""
        await self.state.unbind(conversation_id)
        await self.state.dequeue(conversation_id)
        self._previous.pop(conversation_id, None)
        self._teams.pop(conversation_id, None)
        await self._offer()

    @_runs_to_end
    async def close(self, conversation_id: str, agent_id: str | None = None) -> Conversation:
        """Close in storage (only by its owner when ``agent_id`` is given), then release."""
        kw: dict[str, Any] = {} if agent_id is None else {"from_agent": agent_id}
        keep = agent_id if agent_id is not None else await self.state.owner(conversation_id)
        conv = await self.storage.transition(conversation_id, to_state=CLOSED, agent_id=keep,
                                             from_states=(BOT, QUEUED, HUMAN), **kw)
        if conv is None:
            current = await self.storage.get_conversation(conversation_id)
            if current is None:
                raise RoutingError("not_found", conversation_id)
            if current.state == CLOSED:
                await self.release(conversation_id)
                return current
            raise RoutingError("not_owner", f"{conversation_id} is not with {agent_id}")
        await self.release(conversation_id)
        return conv

    @_runs_to_end
    async def transfer(self, conversation_id: str, from_agent: str, to_agent: str) -> Assigned:
        """Only the owner may transfer; the target must be connected, online (not away) and
        under capacity, and in the conversation's team (else ``forbidden``)."""
        if from_agent == to_agent:
            raise RoutingError("invalid", "cannot transfer to oneself")
        target_team = self.agent_team(to_agent)
        if target_team is not None and target_team != await self.team_of(conversation_id):
            raise RoutingError("forbidden", f"{to_agent} is not in {conversation_id}'s team")
        refused = await self.state.reserve_agent(to_agent)
        if refused:
            raise RoutingError(refused, f"agent {to_agent}: {refused}")
        if await self._claim(conversation_id, to_agent, (HUMAN,), from_agent=from_agent) is None:
            await self._give_back(to_agent)
            current = await self.storage.get_conversation(conversation_id)
            if current is None:
                raise RoutingError("not_found", conversation_id)
            if current.state == HUMAN and current.agent_id:
                await self.state.adopt(conversation_id, current.agent_id)
            raise RoutingError("not_owner", f"{conversation_id} is not with {from_agent}")
        await self.state.commit(conversation_id, to_agent)    # also unbinds from_agent
        event = Assigned(conversation_id, to_agent, previous_agent=from_agent)
        await self._notify(event)
        await self._offer()                                   # from_agent has a free slot
        return event

    async def tick(self) -> list[Assigned | Queued]:
        """About once a second: expire grace periods (re-queue that agent's conversations,
        then offer them to others) and offer the queue.  Returns the events, all of which
        were notified: :class:`Assigned` for every assignment made (``previous_agent`` set for
        a conversation whose agent's grace expired), then :class:`Queued` (with
        ``previous_agent``) for each re-queued conversation still waiting."""
        requeued: list[tuple[str, str]] = []
        now = self.clock()
        for agent_id, convs in await self.state.expire(now):
            for cid in convs:
                try:
                    conv = await self.storage.transition(cid, to_state=QUEUED, agent_id=None,
                                                         from_states=(HUMAN,),
                                                         from_agent=agent_id)
                    if conv is None:      # closed or moved meanwhile: take the stored truth
                        await self._settle(cid, raise_on_lost=False)
                        continue
                except Exception:         # storage trouble: keep it held, retry next tick
                    log.exception("routing: re-queueing %s from %s failed", cid, agent_id)
                    await self.state.hold(agent_id, now)
                    await self.state.adopt(cid, agent_id)
                    continue
                await self.state.enqueue(cid, time.time(), self.team_of_bot(conv.bot))
                self._previous[cid] = agent_id
                requeued.append((cid, agent_id))
        out: list[Assigned | Queued] = list(await self._offer())
        for cid, agent_id in requeued:
            pos = await self.state.position(cid)
            if pos is not None:
                event = Queued(cid, pos, previous_agent=agent_id)
                out.append(event)
                await self._notify(event)
        return out

    async def restore(self) -> None:
        """At start-up: rebuild ownership/load and the queue from storage.  Agents holding
        conversations get the grace period to reconnect, after which :meth:`tick` re-queues."""
        capacities = {a.id: a.capacity for a in await self.storage.list_agents()}
        deadline = self.clock() + self.grace_s
        for conv in await self._all(HUMAN):
            if conv.agent_id is None:
                continue
            await self.state.hold(conv.agent_id, deadline, capacities.get(conv.agent_id, 0))
            await self.state.adopt(conv.id, conv.agent_id)
        for conv in sorted(await self._all(QUEUED), key=lambda c: (c.updated_at, c.created_at)):
            await self.state.enqueue(conv.id, conv.updated_at, self.team_of_bot(conv.bot))

    async def _all(self, state: str) -> list[Conversation]:
        """Every conversation in ``state``, paging with ``before`` (on created_at, newest
        first)."""
        out: list[Conversation] = []
        seen: set[str] = set()
        before: float | None = None
        while True:
            page = await self.storage.list_conversations(state=state, limit=500, before=before)
            fresh = [c for c in page if c.id not in seen]
            if not fresh:
                return out
            seen.update(c.id for c in fresh)
            out.extend(fresh)
            # strictly-before paging would skip rows sharing the boundary time: include it
            before = math.nextafter(min(c.created_at for c in page), math.inf)

    # -- views
    def load(self, agent_id: str) -> int:
        return self.state.load(agent_id)

    def queue(self, team: str | None = None) -> list[str]:
        """Queued conversation ids in order (only ``team``'s when given)."""
        return self.state.queue_ids(team)

    def online_agents(self) -> list[AgentInfo]:
        """Agents with at least one socket open (online or away)."""
        return [a for a in self.state.agents() if a.sockets > 0]

    def agents(self) -> list[AgentInfo]:
        """Every agent routing knows, including those in their grace period."""
        return self.state.agents()

    # -- internals
    async def _assign(self, conversation_id: str, agent_id: str,
                      from_states: Sequence[str]) -> Assigned | Queued:
        """Compare-and-set a reserved slot of ``agent_id`` onto the conversation."""
        if await self._claim(conversation_id, agent_id, from_states) is None:
            await self._give_back(agent_id)
            return await self._settle(conversation_id, raise_on_lost=True)
        return await self._assigned(conversation_id, agent_id)

    async def _claim(self, conversation_id: str, agent_id: str, from_states: Sequence[str],
                     from_agent: str | None = None) -> Conversation | None:
        """The stored compare-and-set onto ``agent_id``'s reserved slot (from ``from_agent``
        only, for a transfer): the row, or None when another writer won.  Storage trouble
        returns the slot and re-raises."""
        kw: dict[str, Any] = {} if from_agent is None else {"from_agent": from_agent}
        try:
            return await self.storage.transition(conversation_id, to_state=HUMAN, agent_id=agent_id,
                                                 from_states=from_states, **kw)
        except BaseException:
            await self.state.cancel(agent_id)
            raise

    async def _assigned(self, conversation_id: str, agent_id: str) -> Assigned:
        """The claim won: move routing's view (queue -> agent's load) and tell everyone."""
        await self.state.dequeue(conversation_id)
        await self.state.commit(conversation_id, agent_id)
        event = Assigned(conversation_id, agent_id,
                         previous_agent=self._previous.pop(conversation_id, None))
        await self._notify(event)
        return event

    async def _give_back(self, agent_id: str) -> None:
        """A compare-and-set lost: return the reserved slot, and offer it to the queue (a
        request that found the slot taken may have queued meanwhile)."""
        await self.state.cancel(agent_id)
        await self._offer()

    async def _settle(self, conversation_id: str, *, raise_on_lost: bool) -> Assigned | Queued:
        """A compare-and-set failed: align our view with the stored row."""
        conv = await self.storage.get_conversation(conversation_id)
        if conv is None or conv.state in (CLOSED, BOT):
            await self.state.unbind(conversation_id)
            await self.state.dequeue(conversation_id)
            if raise_on_lost:
                if conv is None:
                    raise RoutingError("not_found", conversation_id)
                raise RoutingError("closed" if conv.state == CLOSED else "not_queued",
                                   f"{conversation_id} is {conv.state}")
            return Queued(conversation_id, 0)
        if conv.state == HUMAN and conv.agent_id:
            await self.state.dequeue(conversation_id)
            await self.state.adopt(conversation_id, conv.agent_id)
            return Assigned(conversation_id, conv.agent_id)
        # still queued in the database (e.g. queued by another router): keep it in line
        await self.state.unbind(conversation_id)
        await self.state.enqueue(conversation_id, conv.updated_at, self.team_of_bot(conv.bot))
        return Queued(conversation_id, await self.state.position(conversation_id) or 0)

    async def _offer(self) -> list[Assigned]:
        """Offer queued conversations, head first, while some agent has a free slot; each
        team's queue only to that team's agents."""
        out: list[Assigned] = []
        for team in await self.state.queue_teams():
            out += await self._offer_team(team)
        return out

    async def _offer_team(self, team: str) -> list[Assigned]:
        out: list[Assigned] = []
        while await self.state.queue_size(team):
            agent_id = await self.state.reserve(team)
            if agent_id is None:
                break
            head = await self.state.pop_queue(team)
            if head is None:
                await self.state.cancel(agent_id)
                break
            cid, score = head
            try:
                conv = await self._claim(cid, agent_id, (QUEUED,))
            except Exception:
                await self.state.enqueue(cid, score, team)
                log.exception("routing: offering %s failed; it stays queued", cid)
                break
            if conv is None:
                await self.state.cancel(agent_id)
                conv_now = await self.storage.get_conversation(cid)
                if conv_now is not None and conv_now.state == QUEUED:
                    await self.state.enqueue(cid, score, team)   # not ours to drop; retry later
                    break
                if conv_now is not None and conv_now.state == HUMAN and conv_now.agent_id:
                    await self.state.adopt(cid, conv_now.agent_id)
                continue
            out.append(await self._assigned(cid, agent_id))
        return out
