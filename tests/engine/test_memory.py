"""The context memory pool is bounded by count (LRU) and by age (TTL)."""
import pytest

from engine import InMemoryStore, SessionContext


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_least_recently_used_session_is_evicted_when_full():
    store = InMemoryStore(max_sessions=3, ttl_s=60)
    for name in "abc":
        await store.put(SessionContext(session=name, bot="b"))
    await store.get("b", "a")  # touch a: b is now the least recently used
    await store.put(SessionContext(session="d", bot="b"))
    assert len(store) == 3
    assert await store.get("b", "b") is None
    assert await store.get("b", "a") is not None


async def test_sessions_idle_longer_than_the_ttl_are_forgotten():
    clock = Clock()
    store = InMemoryStore(max_sessions=10, ttl_s=30, clock=clock)
    await store.put(SessionContext(session="old", bot="b"))
    clock.now += 20
    await store.put(SessionContext(session="young", bot="b"))
    clock.now += 15  # old idle 35 s, young 15 s
    assert await store.get("b", "old") is None
    assert await store.get("b", "young") is not None
    assert len(store) == 1


async def test_reading_a_session_renews_its_ttl():
    clock = Clock()
    store = InMemoryStore(ttl_s=30, clock=clock)
    await store.put(SessionContext(session="s", bot="b"))
    for _ in range(5):
        clock.now += 20
        assert await store.get("b", "s") is not None


async def test_sessions_of_different_bots_are_separate():
    store = InMemoryStore()
    ctx = await store.load("shop", "s1")
    ctx.slots["order_id"] = "1"
    await store.put(ctx)
    assert (await store.load("other", "s1")).slots == {}
    assert (await store.load("shop", "s1")).slots == {"order_id": "1"}


def test_history_is_bounded_and_context_round_trips_through_a_dict():
    ctx = SessionContext(session="s", bot="b")
    for i in range(100):
        ctx.remember("visitor", f"m{i}")
    assert len(ctx.history) == 20 and ctx.history[-1]["text"] == "m99"
    ctx.slots["x"] = 1
    ctx.counters["misunderstood"] = 2
    again = SessionContext.from_dict(ctx.to_dict())
    assert again.to_dict() == ctx.to_dict()


def test_invalid_bounds_are_refused():
    with pytest.raises(ValueError):
        InMemoryStore(max_sessions=0)


def test_the_engine_keeps_context_across_turns(mini_engine):
    eng = mini_engine()
    eng.ask("mini", "where is my order", session="s")
    eng.ask("mini", "i want a refund", session="s")
    ctx = eng.run(eng.memory.load("mini", "s"))
    assert [h["intent"] for h in ctx.history if h["role"] == "visitor"] == ["order/status", "refund"]
    assert ctx.counters["turns"] == 2
