"""RoutingState's contract, one rule per test, on the in-process state and on Redis (a real
one: ``KEFU_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/0``; each test under its own
prefix, deleted afterwards), then the rules only several workers sharing Redis have.

No sleeps: presence expiry runs on an injected fake clock.
"""
from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter

import pytest
from redis.exceptions import RedisError

from .conftest import FakeClock
from .storage_support import unavailable
from server import redis_client
from server.routing import AgentInfo, InMemoryRoutingState, RoutingError, RoutingState
from server.routing.redis_state import RedisRoutingState

REDIS_URL = os.environ.get("KEFU_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TTL = 10.0


class RedisStates:
    """Workers (RedisRoutingState) over one Redis client; every prefix handed out is deleted
    (SCAN + DEL) and every worker closed at :meth:`aclose`."""

    def __init__(self, client) -> None:
        self.client = client
        self.prefixes: list[str] = []
        self.workers: list[RedisRoutingState] = []

    @classmethod
    async def open(cls) -> "RedisStates":
        client = redis_client.client(REDIS_URL)
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await client.aclose()
            unavailable(f"Redis at {REDIS_URL}", exc)
        return cls(client)

    def new_prefix(self) -> str:
        self.prefixes.append(f"kefu-test-{uuid.uuid4().hex}:")
        return self.prefixes[-1]

    async def worker(self, prefix: str | None = None, *, clock=None, start: bool = True,
                     worker_id: str | None = None) -> RedisRoutingState:
        """A worker on ``prefix`` (a fresh one when None: a state of its own)."""
        st = RedisRoutingState(self.client, prefix=prefix or self.new_prefix(),
                               worker_id=worker_id or f"w{len(self.workers) + 1}",
                               presence_ttl_s=TTL, **({} if clock is None else {"clock": clock}))
        self.workers.append(st)
        if start:
            await st.start()
        return st

    async def delete_keys(self, prefix: str) -> None:
        async for key in self.client.scan_iter(match=prefix + "*", count=500):
            await self.client.delete(key)

    async def aclose(self) -> None:
        try:
            for st in self.workers:
                await st.close()
            for prefix in self.prefixes:
                await self.delete_keys(prefix)
        finally:
            await self.client.aclose()


@pytest.fixture
async def redis_states():
    states = await RedisStates.open()
    try:
        yield states
    finally:
        await states.aclose()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture(params=["memory", "redis"])
async def state(request, clock):
    if request.param == "memory":
        yield InMemoryRoutingState()
        return
    states = await RedisStates.open()
    try:
        yield await states.worker(clock=clock)
    finally:
        await states.aclose()


async def info(st: RoutingState, agent_id: str) -> AgentInfo | None:
    return next((a for a in await st.agents() if a.agent_id == agent_id), None)


async def assign(st: RoutingState, cid: str, team: str = "default") -> str | None:
    """Reserve a slot in ``team`` and commit ``cid`` to it, as the router does on a won claim."""
    agent = await st.reserve(team)
    if agent is not None:
        await st.commit(cid, agent)
    return agent


# --------------------------------------------------------------------------- reserve
async def test_reserve_takes_the_least_loaded_agent_and_breaks_ties_round_robin(state):
    for a in "cab":                                   # never assigned: ties go by agent id
        await state.connect(a, 10)
    assert [await assign(state, f"x{i}") for i in range(6)] == list("abcabc")
    await state.unbind("x5")                          # c's latest: loads a2 b2 c1
    assert await assign(state, "y1") == "c"           # least loaded
    # all at 2 again: a got its last one before b and c did
    assert [await assign(state, f"y{i}") for i in (2, 3, 4)] == list("abc")
    assert [await state.load(a) for a in "abc"] == [3, 3, 3]


async def test_reserve_never_exceeds_capacity_and_pending_slots_count_as_load(state):
    await state.connect("a", 2)
    assert await state.reserve() == "a" and await state.reserve() == "a"
    assert await state.load("a") == 2                 # two slots in flight
    assert await state.reserve() is None
    await state.commit("c1", "a")
    await state.cancel("a")
    assert await state.load("a") == 1
    assert await state.reserve() == "a"
    assert await state.reserve() is None
    await state.cancel("a")
    await state.cancel("a")                           # nothing pending: no effect
    assert await state.load("a") == 1
    await state.set_capacity("a", 0)
    assert await state.reserve() is None


async def test_reserve_skips_away_disconnected_and_other_teams_agents(state):
    await state.connect("away", 5)
    await state.set_status("away", "away")
    await state.connect("gone", 5)
    await state.disconnect("gone", 2000.0)
    await state.connect("sales", 5, "sales")
    assert await state.reserve() is None
    assert await state.reserve("sales") == "sales"
    assert await state.reserve("nobody") is None
    await state.set_status("away", "online")
    assert await state.reserve() == "away"


async def test_reserve_agent_refuses_unknown_disconnected_away_and_full_agents(state):
    assert await state.reserve_agent("nobody") == "agent_unavailable"
    await state.connect("d", 1)
    await state.disconnect("d", 2000.0)
    assert await state.reserve_agent("d") == "agent_unavailable"
    await state.connect("a", 1)
    await state.set_status("a", "away")
    assert await state.reserve_agent("a") == "agent_unavailable"
    assert await state.reserve_agent("a", allow_away=True) is None     # by hand, while away
    assert await state.reserve_agent("a", allow_away=True) == "agent_full"
    assert await state.load("a") == 1


async def test_set_status_and_capacity_answer_none_for_unknown_agents(state):
    assert await state.set_status("nobody", "away") is None
    assert await state.set_capacity("nobody", 3) is None
    await state.connect("a", 1, "sales")
    assert await state.set_status("a", "away") == AgentInfo("a", "away", 1, 1, 0, None, "sales")
    assert await state.set_capacity("a", 4) == AgentInfo("a", "away", 1, 4, 0, None, "sales")


# --------------------------------------------------------------------------- ownership
async def test_commit_cancel_adopt_and_unbind_keep_owner_and_load(state):
    await state.connect("a", 1)
    await state.connect("b", 1)
    assert await state.reserve_agent("a") is None
    await state.commit("c1", "a")
    assert await state.owner("c1") == "a" and await state.load("a") == 1
    assert await state.adopt("c2", "a")               # learnt from the database: over capacity
    assert await state.load("a") == 2
    assert await state.reserve_agent("b") is None
    await state.commit("c1", "b")                     # a transfer: a loses it
    assert (await state.owner("c1"), await state.load("a"), await state.load("b")) == ("b", 1, 1)
    assert not await state.adopt("c2", "ghost")       # unknown agent: nothing recorded, unbound
    assert await state.owner("c2") is None and await state.load("a") == 0
    assert await state.unbind("c1") == "b"
    assert await state.unbind("c1") is None
    assert await state.owner("c1") is None and await state.load("b") == 0


async def test_commit_for_a_vanished_agent_recreates_it_until_the_next_expire(state):
    await state.commit("c1", "ghost")
    assert await state.owner("c1") == "ghost" and await state.load("ghost") == 1
    assert await state.expire(0.0) == [("ghost", ["c1"])]
    assert await state.owner("c1") is None and await state.agents() == []


# --------------------------------------------------------------------------- queue
async def test_queue_keeps_each_team_in_order_and_counts_positions_per_team(state):
    for cid, score, team in (("s1", 1.0, "sales"), ("d1", 2.0, "default"), ("s2", 3.0, "sales"),
                             ("d2", 0.5, "default"), ("s3", 3.0, "sales")):
        assert await state.enqueue(cid, score, team)
    assert await state.enqueue("s1", 9.0, "sales")  # already queued: unchanged
    assert await state.queue_size() == 5 and await state.queue_size("sales") == 3 and await state.queue_size("vip") == 0
    assert [await state.position(c) for c in ("s1", "s2", "s3", "d2", "d1")] == [1, 2, 3, 1, 2]
    assert await state.queue_ids("sales") == ["s1", "s2", "s3"]           # equal scores: arrival order
    assert await state.queue_ids() == ["d2", "s1", "d1", "s2", "s3"]       # all teams, merged by score
    assert await state.queue_teams() == ["default", "sales"]          # the head that sorts first first
    assert await state.dequeue("s2") and not await state.dequeue("s2")
    assert await state.position("s3") == 2
    assert await state.pop_queue("sales") == ("s1", 1.0)
    assert await state.pop_queue("sales") == ("s3", 3.0)
    assert await state.pop_queue("sales") is None and await state.position("s3") is None
    assert await state.queue_teams() == ["default"] and await state.queue_size() == 2


async def test_queue_equal_scores_keep_arrival_order_beyond_nine_arrivals(state):
    ids = [f"c{i}" for i in range(12)]                # arrival 10 must not sort before 9
    for cid in ids:
        await state.enqueue(cid, 5.0)
    assert await state.queue_ids() == ids and await state.position("c11") == 12


async def test_pop_queue_returns_the_score_exactly(state):
    score = 1767225600.123456789
    await state.enqueue("c", score)
    assert await state.pop_queue() == ("c", score)
    assert await state.pop_queue() is None


async def test_owned_conversations_are_never_queued_and_binding_takes_them_out(state):
    await state.connect("a", 5)
    for cid in ("c1", "c2", "c3"):
        await state.enqueue(cid, 1.0)
    await assign(state, "c1")                         # commit dequeues
    assert await state.adopt("c2", "a")               # so does adopt
    assert await state.queue_ids() == ["c3"] and await state.position("c1") is None
    assert not await state.enqueue("c1", 1.0) and not await state.enqueue("c2", 1.0)
    assert await state.queue_size() == 1 and await state.queue_teams() == ["default"]
    await state.unbind("c1")
    assert await state.enqueue("c1", 0.5) and await state.queue_ids() == ["c1", "c3"]


# --------------------------------------------------------------------------- presence, grace
async def test_a_second_socket_keeps_the_agent_connected_after_one_closes(state):
    await state.connect("a", 5)
    assert (await state.connect("a", 5)).sockets == 2
    d = await state.disconnect("a", 2000.0)
    assert (d.sockets, d.grace_deadline) == (1, None)
    d = await state.disconnect("a", 2000.0)
    assert (d.sockets, d.grace_deadline) == (0, 2000.0)
    assert await state.disconnect("nobody", 2000.0) is None
    assert not await state.any_online()


async def test_expire_after_the_grace_deadline_returns_the_conversations_oldest_first(state):
    await state.connect("a", 5)
    await state.connect("b", 5)
    for cid in ("c1", "c2", "c3"):
        assert await state.reserve_agent("a") is None
        await state.commit(cid, "a")
    await state.disconnect("a", 1060.0)
    assert await state.expire(1059.9) == []
    assert await state.expire(1060.0) == [("a", ["c1", "c2", "c3"])]
    assert await state.owner("c1") is None and await state.load("a") == 0
    assert [x.agent_id for x in await state.agents()] == ["b"] and await state.team("a") is None
    assert await state.expire(5000.0) == []


async def test_expire_waits_for_pending_reservations(state):
    await state.connect("a", 5)
    assert await state.reserve() == "a"
    await state.disconnect("a", 10.0)
    assert await state.expire(20.0) == []             # a slot is still in flight
    await state.cancel("a")
    assert await state.expire(20.0) == [("a", [])]


async def test_reconnecting_within_grace_clears_the_deadline(state):
    await state.connect("a", 5)
    await state.adopt("c1", "a")
    await state.disconnect("a", 1060.0)
    assert (await state.connect("a", 5)).grace_deadline is None
    assert await state.expire(9999.0) == []
    assert await state.owner("c1") == "a"


async def test_hold_creates_a_disconnected_agent_with_a_deadline_once(state):
    await state.hold("a", 1030.0, 3)
    await state.hold("a", 1090.0, 7)                  # already held: unchanged
    assert await info(state, "a") == AgentInfo("a", "online", 0, 3, 0, 1030.0, "default")
    assert await state.adopt("c1", "a") and not await state.any_online()
    await state.connect("b", 2)
    await state.hold("b", 1030.0)                     # connected: no deadline
    assert (await info(state, "b")).grace_deadline is None
    assert await state.expire(1030.0) == [("a", ["c1"])]


async def test_announce_is_idempotent_and_zero_sockets_start_the_grace_period_once(state):
    await state.announce("a", 2, 3, "sales", "away", 1050.0)
    await state.announce("a", 2, 3, "sales", "away", 1050.0)
    assert await info(state, "a") == AgentInfo("a", "away", 2, 3, 0, None, "sales")
    await state.announce("a", 0, 3, "sales", "away", 1070.0)
    await state.announce("a", 0, 4, "sales", "online", 1090.0)    # deadline already running
    assert await info(state, "a") == AgentInfo("a", "online", 0, 4, 0, 1070.0, "sales")
    await state.announce("a", 1, 4, "sales", "online", 1090.0)
    assert (await info(state, "a")).grace_deadline is None
    await state.announce("nobody", 0, 4, "sales", "online", 1090.0)   # not held here: nothing
    assert await info(state, "nobody") is None


async def test_a_team_change_moves_the_agent_to_the_new_team(state):
    await state.connect("a", 5, "sales")
    assert await state.reserve("sales") == "a"
    await state.cancel("a")
    await state.connect("a", 5, "support")
    assert await state.team("a") == "support"
    assert await state.reserve("sales") is None and not await state.any_online("sales")
    assert await state.reserve("support") == "a"
    await state.announce("a", 2, 5, "vip", "online", 2000.0)
    assert await state.reserve("support") is None and await state.reserve("vip") == "a"
    assert await state.load("a") == 2


async def test_any_online_needs_a_connected_online_agent_of_the_team(state):
    assert not await state.any_online()
    await state.connect("a", 5, "sales")
    assert await state.any_online() and await state.any_online("sales")
    assert not await state.any_online("default")
    await state.set_status("a", "away")
    assert not await state.any_online() and not await state.any_online("sales")


async def test_agents_are_listed_by_id_with_their_load_and_team(state):
    await state.connect("b", 2, "sales")
    await state.connect("a", 1)
    await state.adopt("c1", "b")
    assert await state.agents() == [AgentInfo("a", "online", 1, 1, 0, None, "default"),
                                    AgentInfo("b", "online", 1, 2, 1, None, "sales")]
    assert await state.team("nobody") is None and await state.load("nobody") == 0


async def test_generation_is_created_by_the_first_caller_only(state):
    token, created = await state.generation()
    assert created
    assert await state.generation() == (token, False)


# --------------------------------------------------------------------------- several workers (Redis)
async def test_sockets_are_counted_across_workers(redis_states, clock):
    w1 = await redis_states.worker(clock=clock)
    w2 = await redis_states.worker(w1.prefix, clock=clock)
    await w1.connect("a", 5)
    await w1.connect("a", 5)
    await w2.connect("a", 5)
    assert (await info(w2, "a")).sockets == 3
    await w1.disconnect("a", 2000.0)
    await w1.disconnect("a", 2000.0)
    await w1.disconnect("a", 2000.0)                  # w1 has none left: w2's socket stays
    assert (await info(w1, "a")).sockets == 1 and await w1.any_online()
    await w2.announce("a", 0, 5, "default", "online", 2000.0)
    assert (await info(w1, "a")).sockets == 0 and (await info(w1, "a")).grace_deadline == 2000.0


async def test_concurrent_reserves_on_two_workers_never_exceed_capacity(redis_states, clock):
    w1 = await redis_states.worker(clock=clock)
    w2 = await redis_states.worker(w1.prefix, clock=clock)
    for a in ("a1", "a2", "a3"):
        await (w1 if a == "a2" else w2).connect(a, 5)
    got = await asyncio.gather(*((w1, w2)[i % 2].reserve() for i in range(60)))
    taken = Counter(a for a in got if a is not None)
    assert taken == {"a1": 5, "a2": 5, "a3": 5}
    assert [await w1.load(a) for a in ("a1", "a2", "a3")] == [5, 5, 5]


async def test_a_worker_that_stops_refreshing_loses_its_sockets_and_its_agents_expire_after_grace(
        redis_states, clock):
    live = await redis_states.worker(clock=clock)
    # never started: connect registers its presence once and nothing refreshes it (a crash)
    dead = await redis_states.worker(live.prefix, clock=clock, start=False)
    await dead.connect("a", 5)
    await live.connect("b", 5)
    await dead.adopt("c1", "a")
    assert (await info(live, "a")).sockets == 1
    clock.advance(TTL + 1)
    await live.refresh_presence()                     # what live's refresher does
    assert (await info(live, "a")).sockets == 0 and (await info(live, "b")).sockets == 1
    assert await live.reserve_agent("a") == "agent_unavailable"
    now = clock()
    assert await live.expire(now, 60.0) == []         # the grace period starts now
    assert (await info(live, "a")).grace_deadline == now + 60.0
    assert await live.expire(now + 59.0, 60.0) == []
    assert await live.expire(now + 60.0, 60.0) == [("a", ["c1"])]
    assert await live.owner("c1") is None and [x.agent_id for x in await live.agents()] == ["b"]


async def test_a_closed_worker_no_longer_counts_and_its_counts_are_pruned(redis_states, clock):
    w1 = await redis_states.worker(clock=clock)
    w2 = await redis_states.worker(w1.prefix, clock=clock)
    await w1.connect("a", 5)
    await w2.connect("a", 5)
    await w2.close()
    assert (await info(w1, "a")).sockets == 1
    await w1.expire(clock())
    assert await redis_states.client.hkeys(w1.root + "s:a") == [b"w1"]


async def test_generation_exactly_one_of_two_concurrent_callers_creates_it_and_a_lost_state_gets_a_new_one(
        redis_states, clock):
    w1 = await redis_states.worker(clock=clock)
    w2 = await redis_states.worker(w1.prefix, clock=clock)
    (t1, c1), (t2, c2) = await asyncio.gather(w1.generation(), w2.generation())
    assert t1 == t2 and sorted([c1, c2]) == [False, True]
    await redis_states.delete_keys(w1.prefix)     # Redis restarted without its data
    (t3, c3), (t4, c4) = await asyncio.gather(w2.generation(), w1.generation())
    assert t3 == t4 != t1 and sorted([c3, c4]) == [False, True]


async def test_scripts_are_loaded_again_after_redis_forgets_them(redis_states, clock):
    st = await redis_states.worker(clock=clock)
    await st.connect("a", 5)
    await redis_states.client.script_flush()         # as after a Redis restart
    assert await st.reserve() == "a"


async def test_every_key_lives_under_the_prefix(redis_states, clock):
    st = await redis_states.worker(clock=clock)
    await st.connect("a", 5)
    await st.adopt("c1", "a")
    await st.enqueue("c2", 1.0)
    await st.generation()
    keys = [k async for k in redis_states.client.scan_iter(match=st.prefix + "*")]
    assert keys and all(k.startswith(st.root.encode()) for k in keys)


async def test_redis_unreachable_raises_routing_unavailable_with_the_cause(clock):
    client = redis_client.client("redis://127.0.0.1:1/0")    # nothing listens on port 1
    st = RedisRoutingState(client, prefix=f"kefu-test-{uuid.uuid4().hex}:", worker_id="w", clock=clock)
    try:
        for call in (st.reserve(), st.owner("c"), st.queue_ids("default"), st.start()):
            with pytest.raises(RoutingError) as e:
                await call
            assert e.value.code == "routing_unavailable"
            assert isinstance(e.value.__cause__, (RedisError, OSError))
        await st.close()                              # withdrawing fails quietly
    finally:
        await client.aclose()
