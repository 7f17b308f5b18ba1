"""The engine's session memory on Redis (server/redis_memory.py) and the per-IP limits
(server/limits.py), each contract on the in-process implementation and on Redis, then the rules
only workers sharing a Redis have.

Real Redis: ``KEFU_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``), each test under a
prefix of its own, deleted afterwards; the "nothing outside the prefix" test uses a private
``redis-server``.  No sleeps: windows and presence run on fake clocks where the code takes one,
and real expiry is a bounded poll on the key.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from typing import Any

import pytest
from redis.exceptions import RedisError

from engine import Engine, InMemoryStore, MemoryStore, SessionContext
from engine.memory import HISTORY_TURNS
from engine.testing import testing_config as engine_config
from .conftest import FakeClock
from .storage_support import unavailable
from server import redis_client
from server.limits import LocalConnectionCap, LocalWindowCounter, RedisConnectionCap, RedisWindowCounter
from server.redis_memory import RedisMemoryStore
from server.routing.redis_state import RedisRoutingState

from . import testbot
from .redis_support import free_port, until

REDIS_URL = os.environ.get("KEFU_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class Spawner:
    """The server's ``spawn(coro, name)`` for background work (RedisConnectionCap.release);
    :meth:`settle` waits for what it started."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task] = []

    def __call__(self, coro: Any, name: str) -> None:
        self.tasks.append(asyncio.create_task(coro, name=name))

    async def settle(self) -> None:
        if self.tasks:
            await asyncio.wait_for(asyncio.gather(*self.tasks), 5)


class Shared:
    """Redis clients ("workers") on one URL; every prefix handed out is deleted and every client
    closed at :meth:`aclose`."""

    def __init__(self, url: str = REDIS_URL) -> None:
        self.url = url
        self.clients: list[Any] = []
        self.prefixes: list[str] = []
        self.closers: list[Any] = []

    def client(self) -> Any:
        r = redis_client.client(self.url)
        self.clients.append(r)
        return r

    def prefix(self) -> str:
        self.prefixes.append(f"kefutest:{uuid.uuid4().hex}:")
        return self.prefixes[-1]

    async def keys(self, prefix: str) -> list[bytes]:
        return sorted([k async for k in self.clients[0].scan_iter(match=prefix + "*", count=500)])

    async def aclose(self) -> None:
        try:
            for close in reversed(self.closers):
                await close()
            if self.clients:
                for prefix in self.prefixes:
                    for key in await self.keys(prefix):
                        await self.clients[0].delete(key)
        finally:
            for r in self.clients:
                await r.aclose()


@pytest.fixture
async def shared():
    s = Shared()
    r = s.client()
    try:
        await r.ping()
    except (RedisError, OSError) as exc:
        await s.aclose()
        unavailable(f"Redis at {REDIS_URL}", exc)
    try:
        yield s
    finally:
        await s.aclose()


@pytest.fixture
async def unreachable():
    """A client for a port nothing listens on (connections are refused at once)."""
    r = redis_client.client(f"redis://127.0.0.1:{free_port()}/0")
    try:
        yield r
    finally:
        await r.aclose()


def context(session: str = "visitor-1", bot: str = "testbot", turns: int = 2) -> SessionContext:
    ctx = SessionContext(session=session, bot=bot)
    for i in range(turns):
        ctx.remember("visitor", f"where is order {i}? 订单", "order/status")
        ctx.remember("bot", f"Order {i} is on its way.")
    ctx.slots.update({"order_id": "A-1234", "awaiting": None, "nested": {"n": [1, 2]}})
    ctx.counters.update({"misunderstood": 1, "turns": turns})
    return ctx


# -- session memory: the contract, on both ---------------------------------------------------

@pytest.fixture(params=["in-process", "redis"])
async def store(request, shared) -> MemoryStore:
    if request.param == "in-process":
        return InMemoryStore(ttl_s=60)
    return RedisMemoryStore(shared.client(), prefix=shared.prefix(), ttl_s=60)


async def test_a_stored_context_reads_back_with_its_history_slots_and_counters(store):
    ctx = context()
    await store.put(ctx)
    got = await store.get("testbot", "visitor-1")
    assert got is not None and got.to_dict() == ctx.to_dict()
    assert got.history.maxlen == HISTORY_TURNS


async def test_an_unknown_session_reads_as_none_and_loads_as_a_fresh_context(store):
    assert await store.get("testbot", "nobody") is None
    fresh = await store.load("testbot", "nobody")
    assert fresh.to_dict() == SessionContext(session="nobody", bot="testbot").to_dict()


async def test_delete_forgets_the_session(store):
    await store.put(context())
    await store.delete("testbot", "visitor-1")
    assert await store.get("testbot", "visitor-1") is None
    await store.delete("testbot", "visitor-1")        # twice: harmless


async def test_sessions_are_kept_apart_by_bot_and_by_visitor(store):
    await store.put(context("v1", "bot-a", turns=1))
    await store.put(context("v1", "bot-b", turns=2))
    await store.put(context("v2", "bot-a", turns=3))
    assert (await store.get("bot-a", "v1")).counters["turns"] == 1
    assert (await store.get("bot-b", "v1")).counters["turns"] == 2
    assert (await store.get("bot-a", "v2")).counters["turns"] == 3
    assert await store.get("bot-b", "v2") is None


async def test_a_context_read_back_keeps_only_the_last_history_turns(store):
    ctx = context(turns=HISTORY_TURNS)           # 2 entries a turn: twice what is kept
    await store.put(ctx)
    got = await store.get("testbot", "visitor-1")
    assert len(got.history) == HISTORY_TURNS and list(got.history) == list(ctx.history)
    got.remember("visitor", "one more")
    assert len(got.history) == HISTORY_TURNS and got.history[-1]["text"] == "one more"


# -- session memory on Redis: between workers -------------------------------------------------

async def test_a_context_written_through_one_worker_is_read_through_another(shared):
    prefix = shared.prefix()
    w1 = RedisMemoryStore(shared.client(), prefix=prefix, ttl_s=60)
    w2 = RedisMemoryStore(shared.client(), prefix=prefix, ttl_s=60)
    ctx = context()
    await w1.put(ctx)
    got = await w2.load("testbot", "visitor-1")
    assert got.to_dict() == ctx.to_dict()
    got.slots["order_id"] = "B-9"
    got.counters["turns"] += 1
    await w2.put(got)
    back = await w1.get("testbot", "visitor-1")
    assert back.slots["order_id"] == "B-9" and back.counters["turns"] == ctx.counters["turns"] + 1
    await w1.delete("testbot", "visitor-1")
    assert await w2.get("testbot", "visitor-1") is None


async def test_a_visitors_misunderstood_count_survives_a_change_of_worker(shared):
    """The engine on two workers, one visitor's turns alternating between them: testbot hands
    off after 3 turns not understood, counted across both."""
    prefix = shared.prefix()
    engines = []
    for _ in range(2):
        memory = RedisMemoryStore(shared.client(), prefix=prefix, ttl_s=60)
        engines.append(await Engine(engine_config(bots=["testbot"]), plugins=[testbot],
                                    load_entrypoints=False, memory=memory).start())
        shared.closers.append(engines[-1].close)
    turns = [await engines[i % 2].handle("testbot", f"qwzx plmk vbnr {i}", session="visitor-9")
             for i in range(3)]
    assert [t.handoff is not None for t in turns] == [False, False, True]
    assert turns[2].handoff.reason == "misunderstood"
    ctx = await engines[1].memory.get("testbot", "visitor-9")
    assert ctx.counters["turns"] == 3
    assert [h["text"] for h in ctx.history if h["role"] == "visitor"] == [f"qwzx plmk vbnr {i}" for i in range(3)]


async def test_the_session_key_expires_ttl_after_its_last_use(shared):
    prefix = shared.prefix()
    r = shared.client()
    store = RedisMemoryStore(r, prefix=prefix, ttl_s=30)
    await store.put(context())
    key = f"{prefix}m:testbot:visitor-1"
    assert await shared.keys(prefix) == [key.encode()]
    assert 29_000 < await r.pttl(key) <= 30_000
    await r.pexpire(key, 5_000)                       # as if idle for 25 s
    assert await store.get("testbot", "visitor-1") is not None
    assert 29_000 < await r.pttl(key) <= 30_000       # a read is a use: the TTL starts again


async def test_an_idle_session_is_forgotten_after_its_ttl_and_starts_fresh(shared):
    prefix = shared.prefix()
    r = shared.client()
    store = RedisMemoryStore(r, prefix=prefix, ttl_s=0.2)
    await store.put(context())
    key = f"{prefix}m:testbot:visitor-1"
    await until(lambda: _not_exists(r, key), timeout=3, what="the key to expire")
    fresh = await store.load("testbot", "visitor-1")
    assert fresh.counters == {} and not fresh.history


async def _not_exists(r: Any, key: str) -> bool:
    return not await r.exists(key)


async def test_an_unreadable_stored_context_starts_fresh_with_a_warning(shared, caplog):
    prefix = shared.prefix()
    r = shared.client()
    store = RedisMemoryStore(r, prefix=prefix, ttl_s=60)
    caplog.set_level(logging.WARNING, logger="kefu.server")
    for raw in (b"{not json", json.dumps({"bot": "testbot"}), json.dumps([1, 2]), b"\xff\xfe"):
        await r.set(f"{prefix}m:testbot:visitor-1", raw)
        assert await store.get("testbot", "visitor-1") is None
        assert (await store.load("testbot", "visitor-1")).counters == {}
    assert sum("unreadable" in rec.getMessage() for rec in caplog.records) == 8


async def test_redis_unreachable_memory_starts_the_turn_fresh_and_logs(unreachable, caplog):
    store = RedisMemoryStore(unreachable, prefix="kefutest:unreachable:", ttl_s=60)
    caplog.set_level(logging.WARNING, logger="kefu.server")
    assert await store.get("testbot", "v") is None
    assert (await store.load("testbot", "v")).to_dict() == SessionContext(session="v", bot="testbot").to_dict()
    await store.put(context())                        # never raises
    await store.delete("testbot", "v")
    messages = [rec.getMessage() for rec in caplog.records if rec.name == "kefu.server"]
    assert any("session memory unavailable" in m for m in messages)
    assert any("session memory not saved" in m for m in messages)
    assert any("session memory not deleted" in m for m in messages)


# -- window counters: the contract, on both ---------------------------------------------------

class FakeTime:
    """``now()`` and ``wait_until(t)`` on the in-process counter's fake clock."""

    def __init__(self) -> None:
        self.clock = FakeClock()

    def now(self) -> float:
        return self.clock()

    async def wait_until(self, t: float) -> None:
        self.clock.t = max(self.clock.t, t + 1e-6)   # (1000.0 + 0.3 - 1000.0 < 0.3 in floats)


class RealTime:
    """``now()`` and ``wait_until(t)`` in real time, for keys Redis really expires (a bounded
    poll on the clock: there is no event for "time has passed").  A ``now()`` read after a hit
    returned is no earlier than the moment Redis set the key's TTL."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def wait_until(self, t: float) -> None:
        await until(lambda: self.now() >= t + 0.002, timeout=t - self.now() + 3, what=f"time {t}")


@pytest.fixture(params=["in-process", "redis"])
async def make_counter(request, shared):
    """``make(limit, window_s)`` -> (counter, time): ``time.now()``, ``await time.wait_until(t)``
    (a fake clock in process; real time on Redis)."""
    prefix = shared.prefix()

    def make(limit: int, window_s: float = 60.0, name: str = "new_conversations"):
        if request.param == "in-process":
            time = FakeTime()
            return LocalWindowCounter(limit, window_s, clock=time.clock), time
        return RedisWindowCounter(shared.client(), prefix, name, limit, window_s), RealTime()
    return make


async def test_a_key_is_refused_once_it_reaches_its_limit(make_counter):
    counter, _ = make_counter(3)
    assert [await counter.hit("10.0.0.1") for _ in range(5)] == [True, True, True, False, False]


async def test_over_says_a_key_is_at_its_limit_without_counting(make_counter):
    counter, _ = make_counter(2)
    assert not await counter.over("10.0.0.1")
    await counter.hit("10.0.0.1")
    assert not await counter.over("10.0.0.1")
    assert not await counter.over("10.0.0.1")          # looking does not count
    await counter.hit("10.0.0.1")
    assert await counter.over("10.0.0.1")


async def test_each_key_has_its_own_count(make_counter):
    counter, _ = make_counter(1)
    assert await counter.hit("10.0.0.1")
    assert not await counter.hit("10.0.0.1")
    assert await counter.hit("10.0.0.2")
    assert not await counter.over("10.0.0.3")


async def test_a_limit_of_zero_never_refuses(make_counter):
    counter, _ = make_counter(0)
    assert all([await counter.hit("10.0.0.1") for _ in range(20)])
    assert not await counter.over("10.0.0.1")


async def test_a_key_is_allowed_again_once_its_window_is_over(make_counter):
    counter, time = make_counter(2, window_s=0.3)
    assert await counter.hit("10.0.0.1")
    first = time.now()
    assert [await counter.hit("10.0.0.1") for _ in range(2)] == [True, False]
    await time.wait_until(first + 0.3)
    assert not await counter.over("10.0.0.1")
    assert [await counter.hit("10.0.0.1") for _ in range(3)] == [True, True, False]


async def test_the_window_starts_at_the_first_event_not_the_last(make_counter):
    counter, time = make_counter(5, window_s=0.4)
    await counter.hit("10.0.0.1")
    first = time.now()
    await time.wait_until(first + 0.25)
    await counter.hit("10.0.0.1")                      # does not extend the window
    await time.wait_until(first + 0.4)                 # 0.4 s after the first, 0.15 s after the last
    assert [await counter.hit("10.0.0.1") for _ in range(6)] == [True] * 5 + [False]


async def test_the_local_counter_sweeps_keys_whose_window_is_over():
    clock = FakeClock()
    counter = LocalWindowCounter(5, 60, clock=clock)
    await counter.hit("a")
    clock.advance(30)
    await counter.hit("b")
    clock.advance(30)
    counter.sweep()
    assert len(counter) == 1
    counter.sweep(clock() + 30)
    assert len(counter) == 0


# -- window counters on Redis -----------------------------------------------------------------

async def test_a_counter_shared_by_two_workers_caps_at_the_limit_across_both(shared):
    prefix = shared.prefix()
    w1 = RedisWindowCounter(shared.client(), prefix, "login_failures", 10)
    w2 = RedisWindowCounter(shared.client(), prefix, "login_failures", 10)
    results = await asyncio.gather(*(w.hit("10.0.0.1") for _ in range(15) for w in (w1, w2)))
    assert results.count(True) == 10
    assert await w1.over("10.0.0.1") and await w2.over("10.0.0.1")
    assert not await w1.hit("10.0.0.1") and not await w2.hit("10.0.0.1")


async def test_the_counter_key_lives_under_the_prefix_and_expires_with_its_window(shared):
    prefix = shared.prefix()
    r = shared.client()
    counter = RedisWindowCounter(r, prefix, "bot_replies", 5, window_s=60)
    for _ in range(3):
        await counter.hit("10.0.0.1")
    key = f"{prefix}w:bot_replies:10.0.0.1"
    assert await shared.keys(prefix) == [key.encode()]
    assert int(await r.get(key)) == 3
    first = await r.pttl(key)
    assert 59_000 < first <= 60_000

    async def ran_down() -> bool:
        return await r.pttl(key) < first - 20
    await until(ran_down, what="the TTL to run down")
    left = await r.pttl(key)
    await counter.over("10.0.0.1")
    await counter.hit("10.0.0.1")
    assert await r.pttl(key) <= left                   # later hits do not extend the window


async def test_redis_unreachable_counter_allows_every_event_and_warns(unreachable, caplog):
    counter = RedisWindowCounter(unreachable, "kefutest:unreachable:", "new_conversations", 1)
    caplog.set_level(logging.WARNING, logger="kefu.server")
    assert [await counter.hit("10.0.0.1") for _ in range(3)] == [True, True, True]
    assert not await counter.over("10.0.0.1")
    assert sum("not counted" in rec.getMessage() for rec in caplog.records) == 3


# -- connection caps: the contract, on both ---------------------------------------------------

@pytest.fixture(params=["in-process", "redis"])
async def make_cap(request, shared):
    """``make(limit)`` -> (cap, settle): ``settle()`` waits for a release's background work."""
    spawner = Spawner()
    prefix = shared.prefix()

    def make(limit: int, worker: str = "w1"):
        if request.param == "in-process":
            async def nothing() -> None:
                return None
            return LocalConnectionCap(limit), nothing
        return RedisConnectionCap(shared.client(), prefix, worker, limit, spawn=spawner), spawner.settle
    yield make
    await spawner.settle()


async def test_sockets_over_the_cap_are_refused_and_not_counted(make_cap):
    cap, _ = make_cap(2)
    assert [await cap.acquire("10.0.0.1") for _ in range(4)] == [True, True, False, False]
    assert await cap.count("10.0.0.1") == 2


async def test_a_released_socket_makes_room_for_another(make_cap):
    cap, settle = make_cap(2)
    await cap.acquire("10.0.0.1")
    await cap.acquire("10.0.0.1")
    cap.release("10.0.0.1")
    await settle()
    assert await cap.count("10.0.0.1") == 1
    assert await cap.acquire("10.0.0.1")
    assert not await cap.acquire("10.0.0.1")
    for _ in range(2):
        cap.release("10.0.0.1")
    await settle()
    assert await cap.count("10.0.0.1") == 0 and len(cap) == 0


async def test_a_cap_of_zero_counts_sockets_but_never_refuses(make_cap):
    cap, _ = make_cap(0)
    assert all([await cap.acquire("10.0.0.1") for _ in range(10)])
    assert await cap.count("10.0.0.1") == 10


async def test_each_ip_is_capped_separately_and_counted_in_len(make_cap):
    cap, _ = make_cap(1)
    assert await cap.acquire("10.0.0.1")
    assert not await cap.acquire("10.0.0.1")
    assert await cap.acquire("10.0.0.2")
    assert len(cap) == 2
    assert await cap.count("10.0.0.3") == 0


async def test_releasing_more_than_was_acquired_never_goes_below_zero(make_cap):
    cap, settle = make_cap(1)
    await cap.acquire("10.0.0.1")
    for _ in range(3):
        cap.release("10.0.0.1")
    await settle()
    assert await cap.count("10.0.0.1") == 0
    assert await cap.acquire("10.0.0.1")
    assert await cap.count("10.0.0.1") == 1


# -- connection caps on Redis: across workers -------------------------------------------------

class CapWorkers:
    """Workers sharing one prefix: each a RedisRoutingState (its presence in ``r:workers``) and
    a RedisConnectionCap, on one fake clock."""

    def __init__(self, shared: Shared, limit: int) -> None:
        self.shared, self.limit = shared, limit
        self.prefix = shared.prefix()
        self.clock = FakeClock(1_000_000.0)
        self.spawner = Spawner()

    async def worker(self, worker_id: str, *, present: bool = True) -> tuple[RedisConnectionCap, RedisRoutingState]:
        r = self.shared.client()
        state = RedisRoutingState(r, prefix=self.prefix, worker_id=worker_id, presence_ttl_s=10, clock=self.clock)
        if present:
            await state.refresh_presence()
        cap = RedisConnectionCap(r, self.prefix, worker_id, self.limit, spawn=self.spawner, clock=self.clock)
        return cap, state


async def test_the_cap_counts_sockets_across_two_workers(shared):
    ws = CapWorkers(shared, limit=3)
    cap1, _ = await ws.worker("node-a/0/1")
    cap2, _ = await ws.worker("node-b/0/1")
    assert await cap1.acquire("10.0.0.1") and await cap1.acquire("10.0.0.1")
    assert await cap2.acquire("10.0.0.1")
    assert not await cap2.acquire("10.0.0.1") and not await cap1.acquire("10.0.0.1")
    assert await cap1.count("10.0.0.1") == 3 and await cap2.count("10.0.0.1") == 3
    cap1.release("10.0.0.1")
    await ws.spawner.settle()
    assert await cap2.count("10.0.0.1") == 2
    assert await cap2.acquire("10.0.0.1")
    assert cap1.held == {"10.0.0.1": 1} and cap2.held == {"10.0.0.1": 2}


async def test_a_burst_of_upgrades_on_two_workers_never_gets_past_the_cap(shared):
    ws = CapWorkers(shared, limit=5)
    cap1, _ = await ws.worker("w1")
    cap2, _ = await ws.worker("w2")
    results = await asyncio.gather(*(c.acquire("10.0.0.1") for _ in range(20) for c in (cap1, cap2)))
    assert results.count(True) == 5
    assert await cap1.count("10.0.0.1") == 5
    assert sum(cap1.held.values()) + sum(cap2.held.values()) == 5


async def test_a_dead_workers_sockets_stop_counting_once_its_presence_expires(shared):
    ws = CapWorkers(shared, limit=2)
    cap1, state1 = await ws.worker("live")
    cap2, _ = await ws.worker("dead")
    assert await cap2.acquire("10.0.0.1") and await cap2.acquire("10.0.0.1")
    assert not await cap1.acquire("10.0.0.1")
    ws.clock.advance(9)                                # within the presence TTL: still counted
    await state1.refresh_presence()
    assert await cap1.count("10.0.0.1") == 2 and not await cap1.acquire("10.0.0.1")
    ws.clock.advance(2)                                # "dead" stopped refreshing 11 s ago
    await state1.refresh_presence()
    assert await cap1.count("10.0.0.1") == 0
    assert await cap1.acquire("10.0.0.1") and await cap1.acquire("10.0.0.1")
    assert not await cap1.acquire("10.0.0.1")
    fields = await shared.clients[0].hkeys(f"{ws.prefix}ip:10.0.0.1")
    assert fields == [b"live"]                         # the dead worker's count was dropped


async def test_a_closed_worker_stops_counting_at_once(shared):
    ws = CapWorkers(shared, limit=1)
    cap1, _ = await ws.worker("w1")
    cap2, state2 = await ws.worker("w2")
    assert await cap2.acquire("10.0.0.1")
    assert not await cap1.acquire("10.0.0.1")
    await state2.close()                               # withdraws its presence
    assert await cap1.acquire("10.0.0.1")


async def test_a_workers_own_sockets_count_even_without_its_presence(shared):
    ws = CapWorkers(shared, limit=2)
    cap, _ = await ws.worker("not-yet-present", present=False)
    assert [await cap.acquire("10.0.0.1") for _ in range(3)] == [True, True, False]
    assert await cap.count("10.0.0.1") == 2


async def test_redis_unreachable_cap_counts_this_workers_own_sockets_only_and_warns(unreachable, caplog):
    spawner = Spawner()
    cap = RedisConnectionCap(unreachable, "kefutest:unreachable:", "w1", 2, spawn=spawner)
    caplog.set_level(logging.WARNING, logger="kefu.server")
    assert [await cap.acquire("10.0.0.1") for _ in range(3)] == [True, True, False]
    assert await cap.count("10.0.0.1") == 2
    cap.release("10.0.0.1")
    await spawner.settle()                             # the release's failure is logged, not raised
    assert await cap.count("10.0.0.1") == 1
    messages = [rec.getMessage() for rec in caplog.records if rec.name == "kefu.server"]
    assert any("counted on this worker only" in m for m in messages)
    assert any("not released" in m for m in messages)


# -- every key under the prefix, and none kept forever ----------------------------------------

async def test_every_key_the_seams_write_is_under_the_prefix_and_expires(private_redis):
    s = Shared(private_redis.url)
    try:
        r = s.client()
        prefix = s.prefix()
        spawner = Spawner()
        await RedisMemoryStore(r, prefix=prefix, ttl_s=60).put(context())
        await RedisWindowCounter(r, prefix, "new_conversations", 5).hit("10.0.0.1")
        cap = RedisConnectionCap(r, prefix, "w1", 5, spawn=spawner)
        await cap.acquire("10.0.0.1")
        await cap.acquire("10.0.0.2")
        cap.release("10.0.0.2")
        await spawner.settle()
        keys = sorted(await r.keys("*"))
        assert keys == sorted(k.encode() for k in (f"{prefix}m:testbot:visitor-1",
                                                  f"{prefix}w:new_conversations:10.0.0.1",
                                                  f"{prefix}ip:10.0.0.1"))
        for key in keys:
            assert await r.ttl(key) > 0, key
    finally:
        await s.aclose()
