"""Steady floods (THREATS 8, issue "Hardening" failure 2), on a real server over real sockets.

* Refusals of the per-socket token bucket are counted over a time window, so a flood paced
  just above the allowed rate (where allowed frames fall between refused ones) is closed
  with 4029 too, not only one sent as fast as possible.
* Typing frames are forwarded at most one per ``TYPING_INTERVAL_S`` per socket and
  conversation: repeats of the same state inside the interval are dropped, a change of state
  goes out at the end of it, so the last state always arrives.
* No false positives: bursts within ``rate_burst`` never close, and refusals older than the
  window are forgotten.
"""
from __future__ import annotations

import asyncio
import uuid

import pytest
from websockets.exceptions import ConnectionClosed

from server import sessions

from .test_limits import closed_with, still_alive


def now() -> float:
    return asyncio.get_running_loop().time()


async def paced(client, make_frame, hz: float, seconds: float, until=lambda: False) -> float | None:
    """Send ``make_frame(i)`` at ``hz`` for ``seconds`` (never faster: a late send does not
    catch up with a burst); the seconds until ``until()`` held or the socket closed, or None."""
    start = next_at = now()
    i = 0
    while now() - start < seconds:
        if until():
            return now() - start
        delay = next_at - now()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await client.send(make_frame(i))
        except ConnectionClosed:
            return now() - start
        i += 1
        next_at = max(next_at + 1 / hz, now())
    return None


def rejected(server) -> float:
    return server.ctx.metrics.value("kefu_frames_rejected_total", code="rate_limited")


async def refuse(server, client, n: int) -> bool:
    """Make the server refuse exactly ``n`` more typing frames of ``client`` (one at a time,
    each followed by a ping: pings are free and answered in order); False if it closed."""
    target = rejected(server) + n
    try:
        while rejected(server) < target:
            await client.send({"type": "typing", "on": True})
            await client.send({"type": "ping"})
            await client.expect("pong")
    except (ConnectionClosed, AssertionError):
        return False
    return True


async def human_conversation(server):
    """An agent and a visitor in one conversation in state human."""
    await server.add_agent("alice")
    agent, _ = await server.agent("alice")
    visitor, vw = await server.visitor()
    cid = vw["conversation"]["id"]
    await visitor.send({"type": "handoff"})
    assigned = await agent.expect("assigned")
    assert assigned["conversation"]["id"] == cid
    return agent, visitor, cid


class Collector:
    """Every typing frame a client receives, with its arrival time, read in the background."""

    def __init__(self, client) -> None:
        self.client = client
        self.got: list[tuple[float, dict]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                frame = await self.client.recv(timeout=30)
                if frame.get("type") == "typing":
                    self.got.append((now(), frame))
        except (ConnectionClosed, asyncio.TimeoutError):
            pass

    async def stop(self) -> list[tuple[float, dict]]:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        return self.got

    async def wait_for(self, pred, timeout: float = 2.0) -> tuple[float, dict]:
        deadline = now() + timeout
        while now() < deadline:
            for item in self.got:
                if pred(item[1]):
                    return item
            await asyncio.sleep(0.005)
        raise AssertionError(f"no typing frame matching; got {[f for _, f in self.got][-8:]}")


def most_in_one_second(times: list[float]) -> int:
    return max((sum(1 for u in times if t <= u < t + 1.0) for t in times), default=0)


# -- (a) a steady flood between the allowed rate and 5x it is closed -----------------------------

@pytest.mark.parametrize("rate, burst, kind, hz", [
    (20.0, 20, "typing", 240.0),     # 3x the allowed 80 typing frames/s (typing costs 1/4)
    (20.0, 20, "message", 40.0),     # 2x the allowed 20 messages/s
    (5.0, 20, "typing", 94.0),       # the report: the default rate, typing at 94 Hz (4.7x)
])
async def test_a_steady_flood_below_5x_the_rate_is_closed(server_factory, rate, burst, kind, hz):
    server = await server_factory(rate_per_s=rate, rate_burst=burst)
    flooder, _ = await server.visitor()
    bystander, _ = await server.visitor()

    def frame(i):
        if kind == "typing":
            return {"type": "typing", "on": bool(i % 2)}
        return {"type": "message", "id": f"m{i}", "text": "spam"}

    def closed_4029() -> float:
        return server.ctx.metrics.value("kefu_connections_closed_total", code="4029")

    after = await paced(flooder, frame, hz, 3.0, until=closed_4029)
    assert after is not None, f"a {hz} Hz {kind} flood was still open after 3 s"
    # The server closes with 4029 (counted per close code).  The client may see 1006 instead:
    # the server drops the TCP connection right after its close frame, and a client still
    # sending gets a reset that can discard the unread close frame (server.sessions.serve;
    # not what this test is about).
    assert await closed_with(flooder) in (4029, 1006)
    assert closed_4029() == 1
    assert rejected(server) >= sessions.RATE_REFUSALS
    assert {f["code"] for f in flooder.frames if f.get("type") == "error"} <= {"rate_limited"}
    await still_alive(bystander)


async def test_an_allowed_frame_between_refusals_does_not_reset_the_count(server_factory):
    server = await server_factory(rate_per_s=4.0, rate_burst=4)
    client, _ = await server.visitor()
    assert await refuse(server, client, 2)
    await asyncio.sleep(0.1)                       # the bucket refills 0.4 tokens: one typing frame
    before = rejected(server)
    await client.send({"type": "typing", "on": False})
    await still_alive(client)
    assert rejected(server) == before              # that one was allowed
    assert await refuse(server, client, 2)         # 4 refusals in the window: still open
    assert not await refuse(server, client, 1)     # the 5th closes
    assert await closed_with(client) == 4029


# -- (b) typing forwarded at most a few per second, the last state always --------------------------

async def test_typing_flood_reaches_the_agent_a_few_times_a_second_and_ends_in_the_last_state(server):
    agent, visitor, cid = await human_conversation(server)
    seen = Collector(agent)
    sent: list[bool] = []

    def frame(i):
        sent.append(i % 2 == 0)
        return {"type": "typing", "on": sent[-1]}

    assert await paced(visitor, frame, 50.0, 2.0) is None        # well within the rate limit
    await asyncio.sleep(sessions.TYPING_INTERVAL_S + 0.3)        # a pending change goes out
    got = await seen.stop()
    frames = [f for _, f in got]
    assert len(sent) >= 80
    assert all(f["conversation"] == cid and f["role"] == "visitor" for f in frames)
    assert 2 <= len(frames) <= 2.0 / sessions.TYPING_INTERVAL_S + 2, len(frames)
    assert most_in_one_second([t for t, _ in got]) <= 1 / sessions.TYPING_INTERVAL_S + 1
    assert frames[-1]["on"] is sent[-1]                          # the final state arrived
    await still_alive(visitor)


async def test_repeated_typing_is_coalesced_and_a_change_gets_through_promptly(server):
    agent, visitor, cid = await human_conversation(server)
    seen = Collector(agent)
    await paced(visitor, lambda i: {"type": "typing", "on": True}, 50.0, 1.0)    # 50 x "on"
    await asyncio.sleep(sessions.TYPING_INTERVAL_S + 0.1)
    ons = [t for t, f in seen.got if f["on"] is True]
    assert 1 <= len(ons) <= 1.0 / sessions.TYPING_INTERVAL_S + 1, len(ons)
    # after a quiet interval a change goes out at once
    sent = now()
    await visitor.send({"type": "typing", "on": False})
    t, _ = await seen.wait_for(lambda f: f["on"] is False)
    assert t - sent < 0.2
    # on then off inside one interval: on at once, off at the end of the interval, not lost
    await asyncio.sleep(sessions.TYPING_INTERVAL_S + 0.05)
    count = len(seen.got)
    await visitor.send({"type": "typing", "on": True})
    await visitor.send({"type": "typing", "on": False})
    sent = now()
    await asyncio.sleep(sessions.TYPING_INTERVAL_S + 0.3)
    got = await seen.stop()
    tail = [f["on"] for _, f in got[count:]]
    assert tail == [True, False], tail
    assert got[-1][0] - sent <= sessions.TYPING_INTERVAL_S + 0.2


async def test_an_agents_typing_flood_is_capped_too(server):
    agent, visitor, cid = await human_conversation(server)
    seen = Collector(visitor)
    sent: list[bool] = []

    def frame(i):
        sent.append(i % 2 == 1)
        return {"type": "typing", "conversation": cid, "on": sent[-1]}

    assert await paced(agent, frame, 50.0, 1.0) is None
    await asyncio.sleep(sessions.TYPING_INTERVAL_S + 0.2)
    got = await seen.stop()
    frames = [f for _, f in got]
    assert all(f["role"] == "agent" for f in frames)
    assert 1 <= len(frames) <= 1.0 / sessions.TYPING_INTERVAL_S + 2, len(frames)
    assert frames[-1]["on"] is sent[-1]                 # the last state sent


# -- (c) bursts within rate_burst, then quiet: never refused, never closed --------------------------

async def test_bursts_within_the_bucket_then_quiet_are_never_closed(server_factory):
    server = await server_factory(rate_per_s=20.0, rate_burst=20)
    client, _ = await server.visitor()
    for round_ in range(3):
        ids = [uuid.uuid4().hex for _ in range(16)]
        for cid in ids:
            await client.send({"type": "message", "id": cid, "text": f"burst {round_}"})
        for _ in range(12):                                       # 16 + 12/4 = 19 tokens
            await client.send({"type": "typing", "on": True})
        acks = set()
        while len(acks) < len(ids):
            f = await client.expect(lambda f: f.get("type") in ("ack", "error"))
            assert f["type"] == "ack", f
            acks.add(f["id"])
        await asyncio.sleep(1.1)                                  # quiet: the bucket refills
    await still_alive(client)
    assert not [f for f in client.frames if f.get("type") == "error"]
    assert rejected(server) == 0


# -- (d) refusals older than the window are forgotten -----------------------------------------------

async def test_refusals_older_than_the_window_are_forgotten(server_factory, monkeypatch):
    monkeypatch.setattr(sessions, "RATE_REFUSAL_WINDOW_S", 1.0)
    server = await server_factory(rate_per_s=4.0, rate_burst=4)
    client, _ = await server.visitor()
    assert await refuse(server, client, sessions.RATE_REFUSALS - 1)      # one short of the close
    errors = [f for f in client.frames if f.get("type") == "error"]
    assert errors and errors[0]["code"] == "rate_limited"
    await asyncio.sleep(1.1)                                             # past the window
    assert await refuse(server, client, sessions.RATE_REFUSALS - 1)      # the first ones are forgotten
    await still_alive(client)
    assert not await refuse(server, client, 1)                           # but these count: closed
    assert await closed_with(client) == 4029


async def test_typing_again_right_after_sending_a_message_is_forwarded(server):
    """Rule: an agent who sends a message (typing off) and starts typing again inside one
    interval is shown typing again: receivers hide the indicator when the message arrives, so
    the "on" is said again at the interval's end, not dropped as a repeat."""
    agent, visitor, cid = await human_conversation(server)
    await agent.send({"type": "typing", "conversation": cid, "on": True})
    assert (await visitor.expect("typing"))["on"] is True
    await agent.message("one moment", conversation=cid)
    await agent.send({"type": "typing", "conversation": cid, "on": False})
    await agent.send({"type": "typing", "conversation": cid, "on": True})
    await visitor.expect(lambda f: f.get("type") == "message" and f.get("text") == "one moment")
    again = await visitor.expect("typing", timeout=2)
    assert again["on"] is True
