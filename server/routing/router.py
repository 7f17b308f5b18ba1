"""The router: least-loaded assignment of conversations to human agents.

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
* Shared state (presence, capacity, load, the queue) lives behind
  :class:`~server.routing.state.RoutingState` (in process, or Redis for several workers and
  nodes: every worker runs a router over the same state).  Slots are *reserved* atomically in
  the state before the compare-and-set and committed or cancelled after it, so no lock is
  ever held across an await.

Notifications: ``notify`` is awaited for every :class:`Assigned` this router makes (from
:meth:`Router.request_human`, the queue, :meth:`Router.accept`, :meth:`Router.transfer`) and
for every :class:`Queued` produced by a grace-period expiry (the visitor's agent left).
:class:`Queued` and :class:`Unavailable` answers to :meth:`Router.request_human` are only
returned, never notified.  A router that lost a race returns the winner's assignment
without notifying (the winner did).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Mapping, Sequence

from server.storage.base import BOT, CLOSED, HUMAN, QUEUED, Conversation, Storage
from server.tasks import run_to_end, wait_all

from .events import Assigned, Event, Queued, RoutingError, Unavailable
from .hours import BusinessHours
from .state import DEFAULT_TEAM, ONLINE, PRESENCES, AgentInfo, InMemoryRoutingState, RoutingState

log = logging.getLogger("kefu.routing")

TEAM_CACHE_SIZE = 10_000   # conversations whose team Router.team_of keeps in memory

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
                 bot_teams: Mapping[str, str] | None = None,
                 on_new_generation: Callable[[], Awaitable[None]] | None = None):
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
        # the shared state's generation this router last saw (None: not started)
        self._generation: str | None = None
        self._on_new_generation = on_new_generation

    async def start(self) -> None:
        """At start-up: adopt the shared state, rebuilding it from the database if this worker
        is the first to use it (see :meth:`sync_generation`)."""
        await self.sync_generation()

    async def sync_generation(self) -> None:
        """Follow the state's generation (:meth:`RoutingState.generation`): the first worker
        to see a new one rebuilds load and queue from the database (:meth:`restore`), and
        every worker that sees it change calls ``on_new_generation`` (which re-announces its
        agents' sockets).  A Redis that restarted empty is refilled this way within a tick."""
        token, created = await self.state.generation()
        if created:
            await self.restore()
        if token != self._generation:
            self._generation = token
            if self._on_new_generation is not None:
                await self._on_new_generation()

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

    async def agent_team(self, agent_id: str) -> str | None:
        """The team an agent connected with; None for an agent routing does not know."""
        return await self.state.team(agent_id)

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

    async def announce(self, agent_id: str, sockets: int, capacity: int, team: str, status: str) -> None:
        """This worker holds ``sockets`` sockets of the agent (after the shared state was lost
        or unreachable; see :meth:`RoutingState.announce`)."""
        await self.state.announce(agent_id, sockets, capacity, team, status, self.clock() + self.grace_s)
        if sockets:
            await self._offer()

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
        if (await self.agent_team(agent_id) or DEFAULT_TEAM) != await self.team_of(conversation_id):
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
        target_team = await self.agent_team(to_agent)
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
        event = Assigned(conversation_id, to_agent, previous_agent=from_agent, transfer=True)
        await self._notify(event)
        await self._offer()                                   # from_agent has a free slot
        return event

    async def tick(self) -> list[Assigned | Queued]:
        """About once a second: expire grace periods (re-queue that agent's conversations,
        then offer them to others) and offer the queue.  Returns the events, all of which
        were notified: :class:`Assigned` for every assignment made (``previous_agent`` set for
        a conversation whose agent's grace expired), then :class:`Queued` (with
        ``previous_agent``) for each re-queued conversation still waiting."""
        if self._generation is not None:
            await self.sync_generation()
        requeued: list[tuple[str, str]] = []
        now = self.clock()
        for agent_id, convs in await self.state.expire(now, self.grace_s):
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
    async def load(self, agent_id: str) -> int:
        return await self.state.load(agent_id)

    async def queue(self, team: str | None = None) -> list[str]:
        """Queued conversation ids in order (only ``team``'s when given)."""
        return await self.state.queue_ids(team)

    async def online_agents(self) -> list[AgentInfo]:
        """Agents with at least one socket open (online or away)."""
        return [a for a in await self.state.agents() if a.sockets > 0]

    async def agents(self) -> list[AgentInfo]:
        """Every agent routing knows, including those in their grace period."""
        return await self.state.agents()

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
