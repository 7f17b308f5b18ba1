"""Slow consumers, dead peers, the timing wheel (THREATS 11, 21, 22)."""
from __future__ import annotations

import asyncio
import json
import statistics
import time

from .conftest import RawSocket


def is_event(name):
    return lambda f: f.get("type") == "message" and f.get("kind") == "event" and f["meta"].get("event") == name


async def ack_latencies(client, cid, n=30, tag="p"):
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        ack = await client.message(f"{tag}{i}", conversation=cid)
        assert ack["type"] == "ack"
        out.append(time.perf_counter() - t0)
    return out


async def test_slow_consumer_is_cut_off_and_others_keep_their_latency(server_factory):
    server = await server_factory(send_queue_frames=32, resume_max_messages=100000, max_text_chars=60000)
    await server.add_agent("fast", capacity=1)
    await server.add_agent("pusher", capacity=1)
    fast_agent, _ = await server.agent("fast")
    # a well-behaved pair
    visitor, vw = await server.visitor()
    fast_cid = vw["conversation"]["id"]
    await visitor.send({"type": "handoff"})
    await fast_agent.expect("assigned")
    baseline = await ack_latencies(fast_agent, fast_cid, tag="base")

    # the slow visitor: a tiny receive buffer, and it never reads
    pusher, _ = await server.agent("pusher")
    slow = await RawSocket.open(server.port, "/ws/visitor", rcvbuf=4096)
    await slow.send_frame(json.dumps({"type": "hello", "bot": "testbot"}).encode())
    await slow.send_frame(b'{"type":"handoff"}')
    assigned = await pusher.expect("assigned")
    slow_cid = assigned["conversation"]["id"]
    big = "z" * 50000
    during: list[float] = []
    sent = 0

    async def flood():
        nonlocal sent
        while server.ctx.metrics.value("kefu_connections_closed_total", code="4008") == 0 and sent < 5000:
            ack = await pusher.message(big, conversation=slow_cid)
            assert ack["type"] == "ack"
            sent += 1

    t0 = time.perf_counter()
    flood_task = asyncio.create_task(flood())
    while not flood_task.done():
        during.extend(await ack_latencies(fast_agent, fast_cid, n=5, tag="during"))
    await flood_task
    print(f"slow consumer cut after {sent} messages, {time.perf_counter() - t0:.2f}s; "
          f"median ack baseline {statistics.median(baseline)*1000:.2f} ms, during {statistics.median(during)*1000:.2f} ms")
    assert server.ctx.metrics.value("kefu_connections_closed_total", code="4008") == 1
    assert sent < 5000
    # the slow connection is gone from the registry; its queue never held more than 32 frames
    assert all(c.kind == "agent" or c.visitor_id == vw["visitor"] for c in server.ctx.registry.connections)
    ratio = statistics.median(during) / statistics.median(baseline)
    assert ratio < 20, (ratio, statistics.median(baseline), statistics.median(during))
    slow.close()
    # it recovers on reconnect: resume gives every message, in order
    pusher_token = None  # noqa: F841  (the pusher keeps going; nothing to do)
    status, data = await server.http("GET", f"/api/v1/conversations/{slow_cid}", token=await server.login("pusher"))
    assert status == 200 and data["last_seq"] >= sent


async def test_dead_peer_is_detected_by_the_heartbeat(server_factory):
    server = await server_factory(heartbeat_s=0.3, heartbeat_timeout_s=0.3, tick_s=0.1)
    alive, _ = await server.visitor()      # the websockets client answers pings
    dead = await RawSocket.open(server.port, "/ws/visitor")
    await dead.send_frame(json.dumps({"type": "hello", "bot": "testbot"}).encode())
    # the raw socket reads (and so sees the pings) but never answers them
    assert await dead.close_code(timeout=10) == 4000
    dead.close()
    await alive.send({"type": "ping"})
    await alive.expect("pong")
    assert server.ctx.metrics.value("kefu_connections_closed_total", code="4000") == 1


async def test_one_timing_wheel_no_task_per_connection(server):
    clients = [(await server.visitor())[0] for _ in range(20)]
    ours = sorted(t.get_name().split("-")[1] for t in asyncio.all_tasks()
                  if t.get_name().startswith(("kefu-writer-", "kefu-timing-", "kefu-heartbeat", "kefu-timer")))
    # per connection: its writer; for all of them: one timing wheel (no timer per connection)
    assert ours == ["timing"] + ["writer"] * 20
    assert len(server.ctx.sessions.wheel) == 20
    for c in clients:
        await c.close()
