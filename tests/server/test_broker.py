"""The broker's contract (server/broker.py), on the in-process broker and on Redis, then the
rules only workers sharing a Redis have (server/redis_broker.py).

Real Redis: ``KEFU_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``), each test under a
prefix of its own.  The outage tests start and kill a private ``redis-server`` on a free port
(never the shared one).  No sleeps: waits are events with a timeout, or bounded polls on a
condition where nothing signals it (the two short sleeps left pick *when* to act, they wait for
nothing).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from typing import Any, Callable

import pytest
from redis.exceptions import RedisError

from .redis_support import WAIT, until
from .storage_support import unavailable
from server import redis_client
from server.broker import Broker, InProcessBroker, agent_topic, conversation_topic, team_topic
from server.metrics import Metrics
from server.redis_broker import RedisBroker

REDIS_URL = os.environ.get("KEFU_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def new_prefix() -> str:
    return f"kefutest:{uuid.uuid4().hex}:"


class Inbox:
    """A worker's hub, as far as the broker can tell: records every delivery and wakes waiters."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any], Any]] = []
        self._changed = asyncio.Event()

    def __call__(self, topic: str, payload: dict[str, Any], exclude: Any) -> None:
        self.got.append((topic, payload, exclude))
        self._changed.set()

    def payloads(self, topic: str | None = None) -> list[dict[str, Any]]:
        return [p for t, p, _ in self.got if topic is None or t == topic]

    async def wait_for(self, pred: Callable[[list[tuple[str, dict[str, Any], Any]]], bool],
                       timeout: float = WAIT, what: str = "") -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not pred(self.got):
            self._changed.clear()
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                raise AssertionError(f"not delivered: {what}; got {self.got[-10:]}") from None

    async def wait_payload(self, payload: dict[str, Any], timeout: float = WAIT) -> None:
        await self.wait_for(lambda got: any(p == payload for _, p, _ in got), timeout, repr(payload))


class Workers:
    """RedisBrokers for one test, each a "worker" with its own client and Inbox; every broker
    is closed and every client closed at :meth:`aclose`."""

    def __init__(self, url: str = REDIS_URL) -> None:
        self.url = url
        self.brokers: list[RedisBroker] = []
        self.clients: list[Any] = []

    async def client(self) -> Any:
        r = redis_client.client(self.url)
        self.clients.append(r)
        return r

    async def broker(self, prefix: str, worker_id: str, **kw: Any) -> tuple[RedisBroker, Inbox]:
        """A started broker (a fresh Metrics, its own client); ``kw``: ping_s, retry_s..."""
        b = RedisBroker(await self.client(), prefix=prefix, worker_id=worker_id, metrics=Metrics(), **kw)
        inbox = Inbox()
        b.attach(inbox)
        self.brokers.append(b)
        await b.start()
        assert b.status()["connected"], b.status()
        return b, inbox

    async def aclose(self) -> None:
        stuck = []
        for b in self.brokers:
            try:
                await asyncio.wait_for(b.close(), WAIT)
            except asyncio.TimeoutError:      # (a broken close: end its tasks, then fail the test)
                stuck.append(b.worker_id)
                while not all(t.done() for t in b._tasks):
                    for t in b._tasks:
                        t.cancel()
                    await asyncio.wait(b._tasks, timeout=0.1)
        for r in self.clients:
            await r.aclose()
        assert not stuck, f"close() of {stuck} did not return"


async def _shared_redis_or_skip() -> None:
    r = redis_client.client(REDIS_URL)
    try:
        await r.ping()
    except (RedisError, OSError) as exc:
        unavailable(f"Redis at {REDIS_URL}", exc)
    finally:
        await r.aclose()


@pytest.fixture
async def workers():
    await _shared_redis_or_skip()
    w = Workers()
    try:
        yield w
    finally:
        await w.aclose()


# -- a private redis-server (for the outage, and for "nothing outside the prefix") ------------

# -- the contract, on both --------------------------------------------------------------------

@pytest.fixture(params=["in-process", "redis"])
async def broker(request, workers):
    """One worker's broker, with its Inbox as the hub's delivery callback."""
    if request.param == "in-process":
        b: Broker = InProcessBroker()
        inbox = Inbox()
        b.attach(inbox)
        await b.start()
        try:
            yield b, inbox
        finally:
            await b.close()
    else:
        yield await workers.broker(new_prefix(), "w1")


async def test_publish_delivers_to_this_workers_subscribers_before_it_returns_with_exclude(broker):
    b, inbox = broker
    topic = conversation_topic("c1")
    await b.subscribe(topic)
    sock = object()
    b.publish(topic, {"type": "message", "seq": 1}, sock)
    assert inbox.got == [(topic, {"type": "message", "seq": 1}, sock)]
    b.publish(topic, {"type": "typing"})
    assert inbox.got[1] == (topic, {"type": "typing"}, None)


async def test_a_payload_that_is_not_json_never_fails_the_publisher_and_is_delivered_here(broker):
    """Rule (the contract): publish never fails its caller, even for a frame that cannot
    travel to other workers (not JSON); it is delivered locally, and on Redis counted as dropped."""
    b, inbox = broker
    odd = {"type": "typing", "who": {1, 2}}          # a set: not JSON
    b.publish(conversation_topic("c1"), odd)
    assert inbox.got == [(conversation_topic("c1"), odd, None)]
    b.publish(conversation_topic("c1"), {"type": "typing"})   # and the broker goes on
    assert inbox.got[-1] == (conversation_topic("c1"), {"type": "typing"}, None)
    if isinstance(b, RedisBroker):
        assert b._metrics.value("kefu_broker_dropped_total") == 1


async def test_publish_delivers_locally_even_on_a_topic_nobody_here_subscribed(broker):
    # the hub decides which local sockets want it; the broker never drops its own frame
    b, inbox = broker
    b.publish(agent_topic("a1"), {"cmd": "revoke"})
    assert inbox.got == [(agent_topic("a1"), {"cmd": "revoke"}, None)]


async def test_publish_returns_without_awaiting_and_publish_order_is_kept_locally(broker):
    b, inbox = broker
    topic = team_topic("sales")
    await b.subscribe(topic)
    for n in range(100):
        assert b.publish(topic, {"n": n}) is None
    assert [p["n"] for p in inbox.payloads(topic)] == list(range(100))


async def test_subscribing_twice_and_unsubscribing_an_unknown_topic_are_harmless(broker):
    b, inbox = broker
    topic = conversation_topic("c2")
    await b.subscribe(topic)
    await b.subscribe(topic)
    b.unsubscribe(topic)
    b.unsubscribe(topic)
    b.unsubscribe(conversation_topic("never-subscribed"))
    b.publish(topic, {"x": 1})
    assert inbox.payloads(topic) == [{"x": 1}]


async def test_status_names_the_broker_and_says_it_is_connected(broker):
    b, _ = broker
    st = b.status()
    assert st["connected"] is True
    assert st["broker"] == ("in-process" if isinstance(b, InProcessBroker) else "redis")


async def test_topic_names_say_who_listens():
    assert conversation_topic("x") == "c:x" and agent_topic("x") == "a:x" and team_topic("x") == "t:x"


# -- Redis: between workers -------------------------------------------------------------------

async def test_a_frame_published_after_subscribe_returns_reaches_the_other_worker(workers):
    prefix = new_prefix()
    a, _ = await workers.broker(prefix, "worker-a")
    b, inbox_b = await workers.broker(prefix, "worker-b")
    # "subscribe, then read the database" leaves no gap: no wait between subscribe and publish,
    # on many fresh topics (a race would show on one of them)
    for i in range(20):
        topic = conversation_topic(f"conv-{i}")
        await b.subscribe(topic)
        a.publish(topic, {"type": "message", "seq": i})
    await inbox_b.wait_for(lambda got: len(got) == 20, what="20 frames")
    assert [(t, p) for t, p, _ in inbox_b.got] == [
        (conversation_topic(f"conv-{i}"), {"type": "message", "seq": i}) for i in range(20)]
    assert all(ex is None for _, _, ex in inbox_b.got)     # exclude is local to the publisher
    assert b._metrics.value("kefu_broker_received_total") == 20
    assert b.status()["subscriptions"] == 20


async def test_many_frames_arrive_at_the_other_worker_in_publish_order_across_topics(workers):
    prefix = new_prefix()
    a, _ = await workers.broker(prefix, "worker-a")
    b, inbox_b = await workers.broker(prefix, "worker-b")
    topics = [conversation_topic("c1"), agent_topic("ag1"), team_topic("sales")]
    for t in topics:
        await b.subscribe(t)
    n = 3000          # more than one pipeline batch
    for i in range(n):
        a.publish(topics[i % 3], {"i": i, "text": "x" * (i % 50)})
    await inbox_b.wait_for(lambda got: len(got) >= n, timeout=15, what=f"{n} frames")
    assert [p["i"] for p in inbox_b.payloads()] == list(range(n))
    assert all(t == topics[p["i"] % 3] for t, p, _ in inbox_b.got)
    await until(lambda: a._metrics.value("kefu_broker_published_total") == n, what="published count")


async def test_a_worker_ignores_its_own_echo_so_its_frame_is_delivered_here_exactly_once(workers):
    prefix = new_prefix()
    a, inbox_a = await workers.broker(prefix, "worker-a")
    b, inbox_b = await workers.broker(prefix, "worker-b")
    topic = conversation_topic("c1")
    await a.subscribe(topic)
    await b.subscribe(topic)
    a.publish(topic, {"n": "mine"})
    await inbox_b.wait_payload({"n": "mine"})      # Redis has sent it to both subscriptions
    # a frame from someone else on the same channel arrives after a's echo, on the same connection
    b.publish(topic, {"n": "marker"})
    await inbox_a.wait_payload({"n": "marker"})
    assert inbox_a.payloads(topic) == [{"n": "mine"}, {"n": "marker"}]
    assert a._metrics.value("kefu_broker_received_total") == 1
    assert inbox_b.payloads(topic) == [{"n": "mine"}, {"n": "marker"}]


async def test_after_unsubscribe_frames_on_that_topic_no_longer_arrive(workers):
    prefix = new_prefix()
    a, _ = await workers.broker(prefix, "worker-a")
    b, inbox_b = await workers.broker(prefix, "worker-b")
    gone, kept = conversation_topic("gone"), conversation_topic("kept")
    await b.subscribe(gone)
    await b.subscribe(kept)
    a.publish(gone, {"n": 1})
    await inbox_b.wait_payload({"n": 1})
    b.unsubscribe(gone)
    assert b.status()["subscriptions"] == 1
    # unsubscribe() does not wait: poll Redis until the UNSUBSCRIBE is in effect
    probe = await workers.client()
    channel = (prefix + "b:" + gone).encode()

    async def unsubscribed() -> bool:
        return dict(await probe.pubsub_numsub(channel))[channel] == 0
    await until(unsubscribed, what="the UNSUBSCRIBE to take effect")
    a.publish(gone, {"n": 2})
    a.publish(kept, {"n": "marker"})     # one pipeline, in order: after the frame on `gone`
    await inbox_b.wait_payload({"n": "marker"})
    assert inbox_b.payloads() == [{"n": 1}, {"n": "marker"}]


async def test_subscribe_after_unsubscribe_is_in_effect_again_when_it_returns(workers):
    prefix = new_prefix()
    a, _ = await workers.broker(prefix, "worker-a")
    b, inbox_b = await workers.broker(prefix, "worker-b")
    topic = agent_topic("ag1")
    for round_ in range(5):
        await b.subscribe(topic)
        a.publish(topic, {"round": round_})
        await inbox_b.wait_payload({"round": round_})
        b.unsubscribe(topic)      # ordered before the next subscribe: never undoes it
    assert inbox_b.payloads() == [{"round": r} for r in range(5)]


async def test_an_unreadable_payload_is_skipped_with_a_warning_and_the_next_frame_arrives(workers, caplog):
    prefix = new_prefix()
    a, _ = await workers.broker(prefix, "worker-a")
    b, inbox_b = await workers.broker(prefix, "worker-b")
    topic = conversation_topic("c1")
    await b.subscribe(topic)
    raw = await workers.client()
    channel = prefix + "b:" + topic
    caplog.set_level(logging.WARNING, logger="kefu.broker")
    bad = [b"not json", b"\xff\xfe", b"[1, 2]", b"42", json.dumps({"o": "worker-x"}).encode()]
    for data in bad:
        assert await raw.publish(channel, data) == 1
    a.publish(topic, {"n": "good"})            # PUBLISHed after the bad ones were processed
    await inbox_b.wait_payload({"n": "good"})
    assert inbox_b.payloads() == [{"n": "good"}]
    warnings = [r for r in caplog.records if r.name == "kefu.broker" and "unreadable payload" in r.getMessage()]
    assert len(warnings) == len(bad)
    assert b.status()["connected"]
    # a well-formed envelope from another worker (the documented wire format) is delivered
    await raw.publish(channel, json.dumps({"o": "worker-x", "p": {"n": "raw"}}))
    await inbox_b.wait_payload({"n": "raw"})


async def test_every_channel_the_broker_uses_is_under_its_prefix(private_redis):
    w = Workers(private_redis.url)
    try:
        prefix = new_prefix()
        a, _ = await w.broker(prefix, "worker-a")
        b, inbox_b = await w.broker(prefix, "worker-b")
        topics = [conversation_topic("c1"), agent_topic("ag1"), team_topic("t1")]
        for t in topics:
            await b.subscribe(t)
            a.publish(t, {"t": t})
        await inbox_b.wait_for(lambda got: len(got) == 3, what="3 frames")
        probe = await w.client()
        channels = sorted(await probe.pubsub_channels())
        assert channels == sorted((prefix + "b:" + t).encode() for t in topics)
        assert await probe.dbsize() == 0                # the broker stores nothing
    finally:
        await w.aclose()


# -- Redis: an outage -------------------------------------------------------------------------

async def test_after_redis_restarts_the_broker_resubscribes_by_itself_within_5_s_and_calls_on_recovered(
        private_redis, caplog):
    caplog.set_level(logging.WARNING, logger="kefu.broker")
    loop = asyncio.get_running_loop()
    w = Workers(private_redis.url)
    try:
        prefix = new_prefix()
        a, inbox_a = await w.broker(prefix, "worker-a")
        b, inbox_b = await w.broker(prefix, "worker-b")
        recovered = asyncio.Event()
        recoveries = []

        async def on_recovered() -> None:
            recoveries.append(loop.time())
            recovered.set()
        b.on_recovered = on_recovered
        topics = [conversation_topic("c1"), agent_topic("ag1")]
        for t in topics:
            await b.subscribe(t)
        a.publish(topics[0], {"n": "before"})
        await inbox_b.wait_payload({"n": "before"})

        private_redis.kill()                                   # SIGKILL: no goodbye on the sockets
        await until(lambda: not b.status()["connected"], what="b to notice the outage")
        await until(lambda: not a.status()["connected"], what="a to notice the outage")
        down = b.status()
        assert down["outages"] == 1 and down["error"] and down["subscriptions"] == 2
        assert b._metrics.value("kefu_broker_outages_total") == 1
        assert not recovered.is_set()

        # publish never fails the caller: delivered here, dropped on the way (at most once)
        a.publish(topics[0], {"n": "during"})
        assert inbox_a.payloads()[-1] == {"n": "during"}
        await until(lambda: a._metrics.value("kefu_broker_dropped_total") >= 1, what="the frame dropped")

        await private_redis.start()                            # same port, empty: no subscriptions
        back_at = loop.time()
        await asyncio.wait_for(recovered.wait(), WAIT)
        assert b.status()["connected"]
        assert recoveries[0] - back_at <= 5.0, recoveries[0] - back_at
        assert recoveries == [recoveries[0]]
        st = b.status()
        assert st["outages"] == 1 and st["subscriptions"] == 2 and "error" not in st
        assert any("back after" in r.getMessage() for r in caplog.records if r.name == "kefu.broker")
        await until(lambda: a.status()["connected"], what="a to reconnect")
        assert a.status()["outages"] == 1

        # re-subscribed by itself: frames published now, on every topic it wanted, arrive
        for t in topics:
            a.publish(t, {"n": "after", "t": t})
        for t in topics:
            await inbox_b.wait_payload({"n": "after", "t": t})
        assert {"n": "during"} not in inbox_b.payloads()       # lost frames are not resent
        assert b.status()["outages"] == 1 and b._metrics.value("kefu_broker_outages_total") == 1
    finally:
        await w.aclose()


async def test_a_topic_subscribed_while_the_broker_resubscribes_is_in_effect_before_on_recovered(private_redis):
    # While the broker is down, subscribe() returns at once and the topic is re-subscribed "with
    # the rest" when Redis is back.  Subscribing a new topic on every turn of the event loop from
    # Redis's return until the broker is up lands some of them after the reconnect took its list
    # of topics to re-subscribe, and before it said it was up (it awaits Redis in between).
    loop = asyncio.get_running_loop()
    w = Workers(private_redis.url)
    try:
        prefix = new_prefix()
        a, _ = await w.broker(prefix, "worker-a")
        b, inbox_b = await w.broker(prefix, "worker-b", retry_s=0.05)
        probe = await w.client()
        late: list[str] = []
        not_in_effect: list[bytes] = []
        recovered = asyncio.Event()

        async def on_recovered() -> None:
            channels = [(prefix + "b:" + t).encode() for t in late]
            not_in_effect.extend(c for c, n in await probe.pubsub_numsub(*channels) if n == 0)
            recovered.set()
        b.on_recovered = on_recovered
        for i in range(50):
            await b.subscribe(conversation_topic(f"before-{i}"))
        private_redis.kill()
        await until(lambda: not b.status()["connected"] and not a.status()["connected"], what="the outage")
        await private_redis.start()
        deadline = loop.time() + WAIT
        while not b.status()["connected"]:
            assert loop.time() < deadline, "the broker did not come back"
            late.append(conversation_topic(f"late-{len(late)}"))
            await b.subscribe(late[-1])             # the broker is down: returns at once
            await asyncio.sleep(0)                  # one turn of the loop
        await asyncio.wait_for(recovered.wait(), WAIT)
        assert not_in_effect == [], f"{len(not_in_effect)} of {len(late)} not subscribed at on_recovered"
        await until(lambda: a.status()["connected"], what="a to reconnect")
        for t in late:
            a.publish(t, {"t": t})
        await inbox_b.wait_for(lambda got: {p["t"] for _, p, _ in got} >= set(late),
                               what=f"a frame on each of the {len(late)} topics subscribed during the outage")
        assert b.status()["subscriptions"] == 50 + len(late)
    finally:
        await w.aclose()


async def test_close_sends_what_is_still_queued(workers):
    prefix = new_prefix()
    a, _ = await workers.broker(prefix, "worker-a")
    b, inbox_b = await workers.broker(prefix, "worker-b")
    topic = conversation_topic("c1")
    await b.subscribe(topic)
    for i in range(50):
        a.publish(topic, {"i": i})
    await a.close()                 # "send what is still queued (briefly) and disconnect"
    assert a._metrics.value("kefu_broker_published_total") == 50
    await inbox_b.wait_for(lambda got: len(got) == 50, what="50 frames sent before close")
    assert [p["i"] for p in inbox_b.payloads()] == list(range(50))


async def test_close_waits_for_the_batch_on_its_way_not_only_for_the_queue(private_redis):
    # The publisher takes a batch off the queue before sending it; here the send is slow (Redis
    # paused, so the new connection's handshake waits): the queue is empty long before the batch
    # is sent, and close() must not cancel it (within its 1 s).
    w = Workers(private_redis.url)
    try:
        prefix = new_prefix()
        a, _ = await w.broker(prefix, "worker-a")
        b, inbox_b = await w.broker(prefix, "worker-b")
        topic = conversation_topic("c1")
        await b.subscribe(topic)
        probe = await w.client()
        await probe.execute_command("CLIENT", "PAUSE", "300", "ALL")
        a.publish(topic, {"n": "last words"})
        await a.close()
        assert a._metrics.value("kefu_broker_published_total") == 1
        await inbox_b.wait_payload({"n": "last words"})
    finally:
        await w.aclose()


async def test_close_returns_promptly_and_closing_twice_is_harmless(workers):
    prefix = new_prefix()
    a, _ = await workers.broker(prefix, "worker-a")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await a.close()
    await a.close()                 # twice: harmless
    assert loop.time() - started < 2.0


async def test_close_returns_promptly_even_when_it_lands_on_a_ping(workers):
    # redis-py sends a command under asyncio.wait_for, which on Python < 3.12 swallows a
    # cancellation landing as the send completes.  With a PING every 10 ms, closes spread over
    # the PING cycle land on one often (before the fix, about one close in five never returned).
    prefix = new_prefix()
    loop = asyncio.get_running_loop()
    for i in range(40):
        b, _ = await workers.broker(prefix, f"worker-{i}", ping_s=0.01)
        await b.subscribe(conversation_topic("c1"))
        await asyncio.sleep((i % 20) * 0.0015)        # not a wait: where in the PING cycle to close
        started = loop.time()
        try:
            await asyncio.wait_for(b.close(), 2.0)
        except asyncio.TimeoutError:
            raise AssertionError(f"close() #{i} did not return within 2 s") from None
        assert loop.time() - started < 2.0
        assert all(t.done() for t in b._tasks)
