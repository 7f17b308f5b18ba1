"""Routing rules, one per test, against the real SQLite storage."""
from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timezone

import pytest

from server.routing import (Assigned, BusinessHours, InMemoryRoutingState, Queued, Router,
                            RoutingError, Unavailable)
from server.storage.base import BOT, CLOSED, HUMAN, QUEUED

from .test_routing_state import RedisStates


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


class Events(list):
    async def __call__(self, event) -> None:
        self.append(event)

    def assigned(self):
        return [e for e in self if isinstance(e, Assigned)]


@pytest.fixture
async def storage(tmp_path):
    from server.storage import open_storage
    st = await open_storage(f"sqlite+aiosqlite:///{tmp_path}/k.sqlite3")
    try:
        yield st
    finally:
        await st.close()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def events():
    return Events()


@pytest.fixture(params=["memory", "redis"])
async def state_factory(request):
    """Routing states for the routers of a test, every test on both: ``await state_factory()``
    is a state of its own (for Redis a fresh prefix), ``await state_factory(same_as=st)`` another
    worker on ``st``'s state (for memory: ``st`` itself)."""
    if request.param == "memory":
        async def memory(same_as=None):
            return same_as if same_as is not None else InMemoryRoutingState()
        yield memory
        return
    states = await RedisStates.open()

    async def redis(same_as=None):
        return await states.worker(None if same_as is None else same_as.prefix)
    try:
        yield redis
    finally:
        await states.aclose()


@pytest.fixture
async def router(storage, clock, events, state_factory):
    return Router(storage, grace_s=60, clock=clock, notify=events, state=await state_factory())


async def new_convs(storage, n: int) -> list[str]:
    return [(await storage.create_conversation(f"v{i}", "shop")).id for i in range(n)]


async def stored(storage, cid):
    c = await storage.get_conversation(cid)
    return c.state, c.agent_id


async def close(storage, router, cid):
    await storage.transition(cid, to_state=CLOSED, agent_id=None)
    await router.release(cid)


# --------------------------------------------------------------------------- assignment
async def test_least_loaded_wins(storage, router):
    c = await new_convs(storage, 5)
    await router.agent_connected("a", 10)
    assert [(await router.request_human(x)).agent_id for x in c[:2]] == ["a", "a"]
    await router.agent_connected("b", 10)
    # b has 0 < a's 2: b gets the next two
    assert [(await router.request_human(x)).agent_id for x in c[2:4]] == ["b", "b"]
    assert (await router.load("a"), await router.load("b")) == (2, 2)
    for x, agent in zip(c[:4], "aabb"):
        assert await stored(storage, x) == (HUMAN, agent)


async def test_capacity_respected(storage, router):
    c = await new_convs(storage, 5)
    await router.agent_connected("a", 1)
    await router.agent_connected("b", 2)
    results = [await router.request_human(x) for x in c]
    assert [type(r) for r in results] == [Assigned] * 3 + [Queued] * 2
    assert Counter(r.agent_id for r in results[:3]) == {"a": 1, "b": 2}
    assert [r.position for r in results[3:]] == [1, 2]
    assert (await router.load("a"), await router.load("b")) == (1, 2)
    assert await stored(storage, c[3]) == (QUEUED, None)


async def test_ties_broken_round_robin_among_equals(storage, router):
    c = await new_convs(storage, 9)
    for a in "abc":
        await router.agent_connected(a, 10)
    got = [(await router.request_human(x)).agent_id for x in c[:6]]
    assert got == ["a", "b", "c", "a", "b", "c"]
    # equal load again after a release: the agent who least recently got one goes first
    await close(storage, router, c[5])         # c's latest: loads a2 b2 c1
    assert (await router.request_human(c[6])).agent_id == "c"    # least loaded
    # now a2 b2 c2; a got its last one before b and c
    assert [(await router.request_human(x)).agent_id for x in c[7:9]] == ["a", "b"]


async def test_away_agents_get_no_new_conversations(storage, router):
    c = await new_convs(storage, 4)
    await router.agent_connected("a", 5)
    assert (await router.request_human(c[0])).agent_id == "a"
    await router.agent_connected("b", 1)
    await router.set_presence("a", "away")
    assert (await router.request_human(c[1])).agent_id == "b"
    assert isinstance(await router.request_human(c[2]), Queued)   # b full, a away
    assert await router.load("a") == 1                                   # a keeps its conversation
    await router.set_presence("b", "away")
    assert await router.request_human(c[3]) == Unavailable(c[3], "no_agents_online")


async def test_fifo_queue_and_offer_on_release(storage, router, events):
    c = await new_convs(storage, 4)
    await router.agent_connected("a", 1)
    assert (await router.request_human(c[0])).agent_id == "a"
    queued = [await router.request_human(x) for x in c[1:]]
    assert queued == [Queued(c[1], 1), Queued(c[2], 2), Queued(c[3], 3)]
    assert await router.queue() == c[1:]
    events.clear()
    await close(storage, router, c[0])
    assert events == [Assigned(c[1], "a")]
    assert await router.queue() == c[2:]
    await close(storage, router, c[1])
    assert events[-1] == Assigned(c[2], "a")
    assert await stored(storage, c[2]) == (HUMAN, "a")
    assert await stored(storage, c[3]) == (QUEUED, None)


async def test_new_request_does_not_jump_the_queue(storage, router):
    c = await new_convs(storage, 3)
    await router.agent_connected("a", 1)
    await router.request_human(c[0])
    await router.request_human(c[1])                  # queued
    await router.set_capacity("a", 0)
    await close(storage, router, c[0])                # a's slot is gone: c1 stays queued
    assert await router.request_human(c[2]) == Queued(c[2], 2)
    await router.set_capacity("a", 1)
    assert await stored(storage, c[1]) == (HUMAN, "a")
    assert await router.queue() == [c[2]]


async def test_offer_when_agent_comes_online(storage, router, events):
    c = await new_convs(storage, 3)
    await router.agent_connected("a", 1)
    await router.request_human(c[0])
    await router.request_human(c[1])
    await router.request_human(c[2])
    events.clear()
    await router.agent_connected("b", 1)
    assert events == [Assigned(c[1], "b")]
    await router.set_presence("a", "away")
    await router.set_capacity("a", 2)                 # away: no offer
    assert await router.queue() == [c[2]]
    await router.set_presence("a", "online")          # back online: offered
    assert events[-1] == Assigned(c[2], "a")
    assert await router.queue() == []


async def test_offer_when_capacity_raised(storage, router, events):
    c = await new_convs(storage, 3)
    await router.agent_connected("a", 1)
    for x in c:
        await router.request_human(x)
    events.clear()
    await router.set_capacity("a", 3)
    assert events == [Assigned(c[1], "a"), Assigned(c[2], "a")]
    assert await router.load("a") == 3


async def test_no_agents_online_unavailable(storage, router):
    (c,) = await new_convs(storage, 1)
    assert await router.request_human(c) == Unavailable(c, "no_agents_online")
    assert await stored(storage, c) == (BOT, None)
    await router.agent_connected("a", 1)
    await router.agent_disconnected("a")              # in its grace period: not online
    assert await router.request_human(c) == Unavailable(c, "no_agents_online")


async def test_business_hours_closed_unavailable(storage, clock, events, state_factory):
    hours = BusinessHours("Europe/Berlin", {"mon": "09:00-17:00"})
    now = [datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)]         # a Sunday
    r = Router(storage, clock=clock, notify=events, business_hours=hours, now=lambda: now[0],
               state=await state_factory())
    (c,) = await new_convs(storage, 1)
    await r.agent_connected("a", 1)
    assert await r.request_human(c) == Unavailable(c, "outside_business_hours")
    assert await stored(storage, c) == (BOT, None)
    now[0] = datetime(2026, 11, 30, 16, 30, tzinfo=timezone.utc)       # Mon 17:30 Berlin
    assert await r.request_human(c) == Unavailable(c, "outside_business_hours")
    now[0] = datetime(2026, 11, 30, 8, 0, tzinfo=timezone.utc)         # Mon 09:00 Berlin
    assert await r.request_human(c) == Assigned(c, "a")


def test_business_hours_parsing():
    assert BusinessHours.from_config({}) is None
    h = BusinessHours.from_config({"timezone": "UTC", "hours": {"fri": "22:00-02:00, 10:00-12:00",
                                                               "Saturday": ["13:00-24:00"]}})
    at = lambda d, hh, mm=0: h.is_open(datetime(2026, 11, d, hh, mm, tzinfo=timezone.utc))
    # 2026-11-27 is a Friday
    assert at(27, 10) and at(27, 11, 59) and not at(27, 12) and at(27, 23)
    assert at(28, 1, 59) and not at(28, 2) and at(28, 13) and at(28, 23, 59)
    assert not at(29, 0, 30) and not at(26, 23)
    with pytest.raises(ValueError):
        BusinessHours("UTC", {"mon": "9-17"})


# --------------------------------------------------------------------------- accept, transfer
async def test_accept_by_hand(storage, router, events):
    c = await new_convs(storage, 3)
    await router.agent_connected("a", 1)
    await router.request_human(c[0])
    await router.request_human(c[1])
    await router.request_human(c[2])
    with pytest.raises(RoutingError) as e:
        await router.accept(c[1], "a")
    assert e.value.code == "agent_full"
    with pytest.raises(RoutingError) as e:
        await router.accept(c[1], "nobody")
    assert e.value.code == "agent_unavailable"
    # b is away (gets nothing offered) but picks c2 by hand, ahead of the queue's head
    await router.agent_connected("b", 0)
    await router.set_presence("b", "away")
    await router.set_capacity("b", 2)
    assert await router.queue() == c[1:]
    events.clear()
    assert await router.accept(c[2], "b") == Assigned(c[2], "b")
    assert events == [Assigned(c[2], "b")]
    assert await router.queue() == [c[1]] and await router.load("b") == 1
    await router.set_capacity("a", 5)                 # a takes c1 from the queue
    assert await router.queue() == [] and await router.load("a") == 2
    with pytest.raises(RoutingError) as e:
        await router.accept(c[2], "a")
    assert e.value.code == "already_assigned"
    assert await stored(storage, c[2]) == (HUMAN, "b")


async def test_transfer_owner_only_and_targets_checked(storage, router, events):
    c = await new_convs(storage, 3)
    await router.agent_connected("a", 5)
    await router.agent_connected("b", 1)
    await router.agent_connected("c", 5)
    for x in c:
        await router.request_human(x)                 # a, b, c
    assert await stored(storage, c[0]) == (HUMAN, "a")

    async def refused(cid, frm, to):
        with pytest.raises(RoutingError) as e:
            await router.transfer(cid, frm, to)
        return e.value.code

    assert await refused(c[0], "c", "c") == "invalid"
    assert await refused(c[0], "b", "c") == "not_owner"          # only the owner
    assert await refused(c[0], "a", "b") == "agent_full"         # b at capacity
    assert await refused(c[0], "a", "nobody") == "agent_unavailable"
    await router.set_presence("c", "away")
    assert await refused(c[0], "a", "c") == "agent_unavailable"  # away target
    await router.set_presence("c", "online")
    await router.agent_connected("d", 1)
    await router.agent_disconnected("d")
    assert await refused(c[0], "a", "d") == "agent_unavailable"  # offline (grace) target
    assert await stored(storage, c[0]) == (HUMAN, "a")
    assert (await router.load("a"), await router.load("c")) == (1, 1)

    events.clear()
    assert await router.transfer(c[0], "a", "c") == Assigned(c[0], "c", previous_agent="a")
    assert events == [Assigned(c[0], "c", previous_agent="a")]
    assert await stored(storage, c[0]) == (HUMAN, "c")
    assert (await router.load("a"), await router.load("c")) == (0, 2)
    assert await refused(c[0], "a", "c") == "not_owner"          # a no longer owns it


# --------------------------------------------------------------------------- grace, tabs
async def test_grace_reconnect_within_grace_keeps_conversations(storage, router, clock, events):
    c = await new_convs(storage, 2)
    await router.agent_connected("a", 5)
    await router.agent_connected("b", 5)
    await router.request_human(c[0])                 # a
    await router.request_human(c[1])                 # b
    await router.agent_disconnected("a")
    clock.advance(59)
    assert await router.tick() == []
    await router.agent_connected("a", 5)
    clock.advance(3600)
    assert await router.tick() == []
    assert await stored(storage, c[0]) == (HUMAN, "a")
    assert await router.load("a") == 1


async def test_grace_expiry_requeues_and_reoffers_to_another_agent(storage, router, clock, events):
    c = await new_convs(storage, 3)
    await router.agent_connected("a", 5)
    for x in c:
        await router.request_human(x)
    await router.agent_connected("b", 1)
    await router.agent_disconnected("a")
    events.clear()
    clock.advance(59.9)
    assert await router.tick() == []
    assert await stored(storage, c[0]) == (HUMAN, "a")
    clock.advance(0.2)
    out = await router.tick()
    # re-queued oldest first, the head offered to b at once; the visitors of the rest are told
    moved, rest = c[0], c[1:]
    assert out == [Assigned(moved, "b", previous_agent="a"),
                   Queued(rest[0], 1, previous_agent="a"), Queued(rest[1], 2, previous_agent="a")]
    assert events == out                              # the server hears about all of them
    assert await stored(storage, moved) == (HUMAN, "b")
    for x in rest:
        assert await stored(storage, x) == (QUEUED, None)
    assert await router.queue() == rest
    assert await router.load("a") == 0 and "a" not in [a.agent_id for a in await router.agents()]
    await router.set_capacity("b", 3)                 # the rest follow in order
    assert [await stored(storage, x) for x in rest] == [(HUMAN, "b")] * 2


async def test_grace_expiry_survives_a_storage_failure(storage, router, clock, monkeypatch):
    from server.storage.base import StorageError
    (c,) = await new_convs(storage, 1)
    await router.agent_connected("a", 1)
    await router.request_human(c)
    await router.agent_disconnected("a")
    clock.advance(61)
    real = storage.transition

    async def failing(*a, **kw):
        raise StorageError("disk full")
    monkeypatch.setattr(storage, "transition", failing)
    assert await router.tick() == []
    assert await router.load("a") == 1                      # still held, not forgotten
    monkeypatch.setattr(storage, "transition", real)
    assert await router.tick() == [Queued(c, 1, previous_agent="a")]
    assert await stored(storage, c) == (QUEUED, None)


async def test_close_by_owner_only(storage, router, events):
    c = await new_convs(storage, 2)
    await router.agent_connected("a", 1)
    await router.agent_connected("b", 1)
    await router.request_human(c[0])                  # a
    await router.request_human(c[1])                  # b
    with pytest.raises(RoutingError) as e:
        await router.close(c[0], "b")
    assert e.value.code == "not_owner"
    closed = await router.close(c[0], "a")
    assert (closed.state, closed.agent_id) == (CLOSED, "a")
    assert await router.load("a") == 0


async def test_two_tabs_one_disconnect_keeps_agent_online(storage, router, clock):
    c = await new_convs(storage, 2)
    await router.agent_connected("a", 5)
    await router.agent_connected("a", 5)              # second tab
    await router.request_human(c[0])
    await router.agent_disconnected("a")              # one tab closed
    assert [x.agent_id for x in await router.online_agents()] == ["a"]
    clock.advance(120)
    assert await router.tick() == []
    assert await router.request_human(c[1]) == Assigned(c[1], "a")
    await router.agent_disconnected("a")              # the last tab: grace starts
    assert await router.online_agents() == []
    clock.advance(60)
    out = await router.tick()
    assert {e.conversation_id for e in out} == set(c) and all(isinstance(e, Queued) for e in out)


# --------------------------------------------------------------------------- concurrency
@pytest.mark.parametrize("same_agents", [False, True], ids=["disjoint-agents", "same-agents"])
async def test_two_routers_assign_each_conversation_exactly_once(storage, clock, same_agents, state_factory):
    """Two routers with their own state (two nodes, no shared load): the database's
    compare-and-set alone decides, and the loser adopts the winner's assignment."""
    ev1, ev2 = Events(), Events()
    r1 = Router(storage, clock=clock, notify=ev1, state=await state_factory())
    r2 = Router(storage, clock=clock, notify=ev2, state=await state_factory())
    names1 = ["a1", "a2", "a3"]
    names2 = names1 if same_agents else ["b1", "b2", "b3"]
    for n in names1:
        await r1.agent_connected(n, 100)
    for n in names2:
        await r2.agent_connected(n, 100)
    c = await new_convs(storage, 50)
    calls = []
    for i, x in enumerate(c):
        # Alternate which router starts first, so each wins some of the races.
        pair = [r1.request_human(x), r2.request_human(x)]
        calls += pair if i % 2 else pair[::-1]
    results = await asyncio.gather(*calls)

    winners = ev1.assigned() + ev2.assigned()
    assert ev1 and ev2                                # both won some: a real race
    assert Counter(e.conversation_id for e in winners) == {x: 1 for x in c}
    by_cid = {e.conversation_id: e.agent_id for e in winners}
    for x in c:
        assert await stored(storage, x) == (HUMAN, by_cid[x])
    for res in results:                               # the loser reports the winner's agent
        assert isinstance(res, Assigned) and res.agent_id == by_cid[res.conversation_id]
    per_agent = Counter(by_cid.values())
    if same_agents:                                   # each loser adopted the truth
        for n in names1:
            assert await r1.load(n) == await r2.load(n) == per_agent[n]
    else:
        assert sum([await r1.load(n) for n in names1]) + sum([await r2.load(n) for n in names2]) == 50


async def test_two_routers_sharing_state_respect_capacity_globally(storage, clock, state_factory):
    """Two routers over one database and one RoutingState (what Redis will be): each
    conversation assigned at most once and no agent over capacity; the rest queued once."""
    shared = await state_factory()
    ev1, ev2 = Events(), Events()
    r1 = Router(storage, clock=clock, notify=ev1, state=shared)
    r2 = Router(storage, clock=clock, notify=ev2, state=await state_factory(same_as=shared))  # Redis: a second worker
    for n in ("a1", "a2", "a3"):
        await r1.agent_connected(n, 5)
    c = await new_convs(storage, 50)
    calls = []
    for x in c:
        calls += [r1.request_human(x), r2.request_human(x)]
    await asyncio.gather(*calls)
    winners = ev1.assigned() + ev2.assigned()
    assert len(winners) == 15 and len({e.conversation_id for e in winners}) == 15
    assert Counter(e.agent_id for e in winners) == {"a1": 5, "a2": 5, "a3": 5}
    states = Counter([(await stored(storage, x))[0] for x in c])
    assert states == {HUMAN: 15, QUEUED: 35}
    assert sorted(await r1.queue()) == sorted(x for x in c if x not in {e.conversation_id for e in winners})
    assert all([await r1.load(n) == 5 for n in ("a1", "a2", "a3")])


async def test_concurrent_requests_one_router_respect_capacity(storage, router):
    c = await new_convs(storage, 30)
    for n in "abc":
        await router.agent_connected(n, 5)
    results = await asyncio.gather(*(router.request_human(x) for x in c))
    assigned = [r for r in results if isinstance(r, Assigned)]
    assert Counter(r.agent_id for r in assigned) == {"a": 5, "b": 5, "c": 5}
    assert sorted(r.position for r in results if isinstance(r, Queued)) == list(range(1, 16))


async def test_a_caller_cancelled_mid_assignment_leaves_storage_and_routing_agreeing(storage, router, events):
    """Rule: storage finishes a write whose caller was cancelled (a visitor's socket closed
    mid-handoff), so routing finishes the operation too: the conversation stored as the
    agent's is counted in the agent's load and announced, never stored but unknown."""
    (cid,) = await new_convs(storage, 1)
    await router.agent_connected("a", 5)
    real = storage.transition
    writing = asyncio.Event()

    async def transition(*args, **kwargs):
        writing.set()
        return await real(*args, **kwargs)

    storage.transition = transition
    caller = asyncio.ensure_future(router.request_human(cid))
    await writing.wait()                  # the compare-and-set is in the database now
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await router.drain()
    assert await stored(storage, cid) == (HUMAN, "a")
    assert await router.load("a") == 1 and await router.state.owner(cid) == "a"
    assert [e.conversation_id for e in events.assigned()] == [cid]


# --------------------------------------------------------------------------- restart
async def test_restore_after_restart_rebuilds_load_and_queue(storage, clock, events, state_factory):
    a = (await storage.add_agent("alice", "x", capacity=1)).id
    r1 = Router(storage, clock=clock, state=await state_factory())
    await r1.agent_connected(a, 1)
    c = await new_convs(storage, 3)
    for x in c:
        await r1.request_human(x)
    assert await r1.queue() == c[1:]

    r2 = Router(storage, clock=clock, notify=events, grace_s=30, state=await state_factory())      # "after the restart"
    await r2.restore()
    assert await r2.load(a) == 1
    assert await r2.queue() == c[1:]
    assert await r2.online_agents() == []
    await r2.agent_connected(a, 2)                   # alice reconnects: keeps c0, gets c1
    assert events == [Assigned(c[1], a)]
    assert (await r2.load(a), await r2.queue()) == (2, [c[2]])


async def test_restore_then_owner_never_returns_requeues(storage, clock, events, state_factory):
    a = (await storage.add_agent("alice", "x", capacity=3)).id
    r1 = Router(storage, clock=clock, state=await state_factory())
    await r1.agent_connected(a, 3)
    c = await new_convs(storage, 2)
    for x in c:
        await r1.request_human(x)
    r2 = Router(storage, clock=clock, notify=events, grace_s=30, state=await state_factory())
    await r2.restore()
    await r2.agent_connected("bob", 5)
    clock.advance(31)
    out = await r2.tick()
    assert sorted(e.conversation_id for e in out if isinstance(e, Assigned)) == sorted(c)
    assert all(e.agent_id == "bob" for e in out if isinstance(e, Assigned))
    for x in c:
        assert await stored(storage, x) == (HUMAN, "bob")


async def test_request_on_closed_or_missing_conversation_refused(storage, router):
    (c,) = await new_convs(storage, 1)
    await router.agent_connected("a", 1)
    await storage.transition(c, to_state=CLOSED, agent_id=None)
    with pytest.raises(RoutingError) as e:
        await router.request_human(c)
    assert e.value.code == "closed"
    assert await router.load("a") == 0
    with pytest.raises(RoutingError) as e:
        await router.request_human("0" * 32)
    assert e.value.code == "not_found"


async def test_inmemory_state_heap_stays_bounded():
    st = InMemoryRoutingState()
    await st.connect("a", 10**6)
    for i in range(5000):
        assert await st.reserve() == "a"
        await st.commit(f"c{i}", "a")
        await st.unbind(f"c{i}")
    assert len(st._heaps["default"]) <= 4 * 1 + 32 + 1


async def test_inmemory_queue_keeps_each_team_in_order_and_counts_positions_per_team():
    """Rule: a conversation's queue position counts only its own team's entries (score, then
    arrival); popping a team never takes another team's conversation."""
    st = InMemoryRoutingState()
    for cid, score, team in (("s1", 1.0, "sales"), ("d1", 2.0, "default"), ("s2", 3.0, "sales"),
                             ("d2", 0.5, "default"), ("s3", 3.0, "sales")):
        assert await st.enqueue(cid, score, team)
    assert await st.enqueue("s1", 9.0, "sales")  # already queued: unchanged
    assert await st.queue_size() == 5 and await st.queue_size("sales") == 3 and await st.queue_size("vip") == 0
    assert [await st.position(c) for c in ("s1", "s2", "s3", "d2", "d1")] == [1, 2, 3, 1, 2]
    assert await st.queue_ids("sales") == ["s1", "s2", "s3"]           # equal scores: arrival order
    assert await st.queue_ids() == ["d2", "s1", "d1", "s2", "s3"]       # all teams, merged by score
    assert await st.queue_teams() == ["default", "sales"]          # the head that sorts first first
    assert await st.dequeue("s2") and not await st.dequeue("s2")
    assert await st.position("s3") == 2
    assert await st.pop_queue("sales") == ("s1", 1.0)
    assert await st.pop_queue("sales") == ("s3", 3.0)
    assert await st.pop_queue("sales") is None and await st.position("s3") is None
    assert await st.queue_teams() == ["default"] and await st.queue_size() == 2


async def test_team_cache_stays_bounded_and_still_answers(storage, monkeypatch):
    """Rule: conversations that are never released (the visitor just left) do not grow the
    router's conversation -> team cache without bound; an evicted one is read again."""
    from server.routing import router as routing

    monkeypatch.setattr(routing, "TEAM_CACHE_SIZE", 3)
    router = Router(storage, bot_teams={"shop": "sales"})
    cids = await new_convs(storage, 6)
    assert [await router.team_of(c) for c in cids] == ["sales"] * 6
    assert len(router._teams) == 3
    assert await router.team_of(cids[0]) == "sales"   # evicted earlier: read from storage again


async def test_team_cache_evicts_the_least_recently_used(storage, monkeypatch):
    """Rule: a conversation whose team is asked for keeps its cache entry; the one nobody asked
    about for longest is evicted (an active chat never pays a database read per routing call)."""
    from server.routing import router as routing

    monkeypatch.setattr(routing, "TEAM_CACHE_SIZE", 3)
    router = Router(storage, bot_teams={"shop": "sales"})
    a, b, c, d = await new_convs(storage, 4)
    for cid in (a, b, c, a):              # a is asked for again: now the most recent
        await router.team_of(cid)
    await router.team_of(d)               # evicts b, the least recently used
    assert list(router._teams) == [c, a, d]
