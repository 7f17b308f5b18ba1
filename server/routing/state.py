"""Routing's shared state: presence, capacity, load and the queue (:class:`RoutingState`), and
its one-process implementation (:class:`InMemoryRoutingState`).  The Redis implementation, for
several workers and nodes, is :mod:`server.routing.redis_state`; both pass the same tests.
"""
from __future__ import annotations

import abc
import bisect
import heapq
import itertools
from dataclasses import dataclass, field

ONLINE, AWAY = "online", "away"
DEFAULT_TEAM = "default"
PRESENCES = (ONLINE, AWAY)


@dataclass(frozen=True)
class AgentInfo:
    """A snapshot of one agent as routing sees it."""
    agent_id: str
    status: str                 # online | away
    sockets: int                # open sockets (tabs), on every worker; 0 while in the grace period
    capacity: int
    load: int                   # open conversations (+ slots reserved for assignments in flight)
    grace_deadline: float | None = None   # set while disconnected and holding conversations
    team: str = DEFAULT_TEAM


class RoutingState(abc.ABC):
    """Presence, capacity, load and the queue.  Every mutating method is atomic, also between
    the workers and nodes that share one state.

    The assignment protocol: :meth:`reserve` (or :meth:`reserve_agent`) takes one slot from an
    eligible agent, the router then does the compare-and-set in the database, then calls
    :meth:`commit` (slot becomes a conversation) or :meth:`cancel` (slot given back).  An
    agent is *eligible* when connected (sockets > 0), ``online`` and ``load < capacity``.
    Because a slot is taken atomically before the database write, two workers never assign
    past an agent's capacity; the database's compare-and-set makes sure one conversation is
    never assigned twice.

    Agents and queued conversations each belong to a team (``connect``/``enqueue``): a slot
    is only ever reserved from, and the queue only offered to, agents of the same team.

    Sockets are counted per worker (:attr:`worker_id`): a worker that dies stops refreshing its
    presence, its sockets stop counting after the presence TTL, and its agents fall into the
    grace period like agents who closed their last tab (:meth:`expire`).

    Times (``deadline``, ``now``) are on the router's clock; a state shared between processes
    needs a clock they share (``time.time``).
    """

    #: Names this process's sockets in a shared state (one per worker process).
    worker_id: str = "local"

    # -- lifecycle
    async def start(self) -> None:
        """Open connections, start refreshing this worker's presence (the in-process one has none)."""

    async def close(self) -> None:
        """Withdraw this worker's presence and close connections."""

    async def generation(self) -> tuple[str, bool]:
        """The state's generation and whether this call created it.  A state starts empty (a
        new process, a Redis that restarted without its data): exactly one caller of a new
        generation gets ``True`` and rebuilds load and queue from the database (the router's
        ``restore``); every worker that sees the generation change re-announces its agents
        (:meth:`announce`)."""
        raise NotImplementedError

    # -- agents
    @abc.abstractmethod
    async def connect(self, agent_id: str, capacity: int, team: str = DEFAULT_TEAM) -> AgentInfo:
        """One more socket (of this worker); sets capacity and team; clears any grace deadline."""

    @abc.abstractmethod
    async def disconnect(self, agent_id: str, deadline: float) -> AgentInfo | None:
        """One socket (of this worker) fewer; when none are left anywhere the agent holds its
        conversations until ``deadline``.  None for an unknown agent."""

    @abc.abstractmethod
    async def announce(self, agent_id: str, sockets: int, capacity: int, team: str, status: str,
                       deadline: float) -> None:
        """This worker holds exactly ``sockets`` sockets of the agent (idempotent: a worker says
        it again after the state was lost or unreachable, and says 0 for an agent it no longer
        holds; at 0 sockets anywhere the grace period runs until ``deadline``)."""

    @abc.abstractmethod
    async def set_status(self, agent_id: str, status: str) -> AgentInfo | None: ...

    @abc.abstractmethod
    async def set_capacity(self, agent_id: str, capacity: int) -> AgentInfo | None: ...

    @abc.abstractmethod
    async def expire(self, now: float, grace_s: float = 0.0) -> list[tuple[str, list[str]]]:
        """Remove agents whose grace deadline passed (no socket came back); return each with
        the conversations it held (which are unbound).  An agent whose sockets all vanished
        without a disconnect (their worker died) gets the deadline ``now + grace_s`` first."""

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
        """A reserved slot of ``agent_id`` now holds ``conversation_id`` (an agent unknown by
        now is recreated holding it, expiring at the next :meth:`expire`)."""

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
        """The teams with conversations queued, the team whose head sorts first first."""

    # -- reads
    @abc.abstractmethod
    async def load(self, agent_id: str) -> int: ...

    @abc.abstractmethod
    async def queue_ids(self, team: str | None = None) -> list[str]:
        """Queued conversation ids in order (one team's, or every team's merged by score)."""

    @abc.abstractmethod
    async def team(self, agent_id: str) -> str | None:
        """The team of an agent this state knows (given at :meth:`connect`), else None."""

    @abc.abstractmethod
    async def agents(self) -> list[AgentInfo]:
        """Every agent this state knows, by id."""


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
        self._generated = False

    async def generation(self) -> tuple[str, bool]:
        first, self._generated = not self._generated, True
        return "memory", first

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

    async def announce(self, agent_id: str, sockets: int, capacity: int, team: str, status: str,
                       deadline: float) -> None:
        a = self._agents.get(agent_id)
        if a is None:
            if sockets <= 0:
                return
            a = self._agents[agent_id] = _Agent(agent_id, capacity)
        a.sockets, a.capacity, a.team, a.status = max(0, sockets), capacity, team, status
        a.deadline = None if a.sockets else (a.deadline if a.deadline is not None else deadline)
        self._touch(a)

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

    async def expire(self, now: float, grace_s: float = 0.0) -> list[tuple[str, list[str]]]:
        # (one process: a disconnect always comes, so no agent loses its sockets silently)
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

    # -- reads
    async def load(self, agent_id: str) -> int:
        a = self._agents.get(agent_id)
        return a.load if a else 0

    async def queue_ids(self, team: str | None = None) -> list[str]:
        queues = self._queues.values() if team is None else [self._queues.get(team, [])]
        return [cid for _, _, cid in heapq.merge(*queues)]

    async def team(self, agent_id: str) -> str | None:
        a = self._agents.get(agent_id)
        return a.team if a else None

    async def agents(self) -> list[AgentInfo]:
        return [a.info() for a in sorted(self._agents.values(), key=lambda a: a.agent_id)]


