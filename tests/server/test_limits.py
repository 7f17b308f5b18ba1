"""Malformed frames, oversize frames, invalid UTF-8, floods, per-IP caps (THREATS 6-10)."""
from __future__ import annotations

import asyncio
import json

from websockets.exceptions import ConnectionClosed

from .conftest import RawSocket


async def closed_with(client) -> int:
    try:
        while True:
            await client.recv()
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else 1006


async def still_alive(client) -> None:
    await client.send({"type": "ping"})
    await client.expect("pong")


async def test_malformed_frames_get_stable_codes_and_keep_the_connection(server):
    client, _ = await server.visitor()
    cases = [
        ("{not json", "bad_json"),
        ("[1, 2, 3]", "bad_frame"),
        ('"just a string"', "bad_frame"),
        ("{}", "missing_field"),
        ('{"type": 42}', "missing_field"),
        ('{"type": "launch_missiles"}', "unknown_type"),
        ('{"type": "message", "text": "no id"}', "missing_field"),
        ('{"type": "message", "id": "m1"}', "missing_field"),
        ('{"type": "message", "id": "m1", "text": 12}', "bad_field"),
        ('{"type": "message", "id": "m1", "text": "nul \\u0000 byte"}', "bad_field"),
        ('{"type": "message", "id": "m1", "text": "   "}', "empty_text"),
        ('{"type": "read", "seq": 1e400}', "bad_json"),
        ('{"type": "read", "seq": 123456789012345678901234567890}', "bad_field"),
        ('{"type": "read", "seq": NaN}', "bad_json"),
        ('{"type": "x", "a": {"b": {"c": {"d": {"e": 1}}}}}', "bad_frame"),
        ("[" * 5000 + "]" * 5000, "bad_json"),
    ]
    for raw, code in cases[:9]:
        await client.send(raw)
        err = await client.expect("error")
        assert err["code"] == code, (raw, err)
    await still_alive(client)
    client2, _ = await server.visitor()
    for raw, code in cases[9:]:
        await client2.send(raw)
        err = await client2.expect("error")
        assert err["code"] == code, (raw[:60], err)
    await still_alive(client2)
    # text too long
    client3, _ = await server.visitor()
    err = await client3.message("x" * 4001)
    assert err["type"] == "error" and err["code"] == "text_too_long" and err["id"]
    assert server.ctx.metrics.value("kefu_frames_rejected_total", code="bad_json") >= 3


async def test_too_many_errors_close_the_connection(server_factory):
    server = await server_factory(max_errors=4)
    client, _ = await server.visitor()
    for _ in range(4):
        await client.send("nope")
    assert await closed_with(client) == 4009


async def test_frame_before_hello_is_refused(server):
    client = await server.connect("/ws/visitor")
    await client.send({"type": "message", "id": "a", "text": "hi"})
    assert (await client.expect("error"))["code"] == "hello_required"


async def test_oversize_frame_closes_1009(server):
    client, _ = await server.visitor()
    await client.send(json.dumps({"type": "message", "id": "big", "text": "x" * 70000}))
    assert await closed_with(client) == 1009
    # and 10 MB from a raw socket: the server stops at the limit
    raw = await RawSocket.open(server.port, "/ws/visitor")
    await raw.send_frame(b'{"type":"hello"}')
    try:
        await raw.send_frame(b"y" * (10 * 1024 * 1024))
    except ConnectionError:
        pass
    assert await raw.close_code() in (1009, None)
    raw.close()
    other, _ = await server.visitor()
    await still_alive(other)


async def test_invalid_utf8_closes_1007(server):
    raw = await RawSocket.open(server.port, "/ws/visitor")
    assert raw.status == 101
    await raw.send_frame(b'{"type":"hello","bot":"\xff\xfe"}')
    assert await raw.close_code() == 1007
    raw.close()
    other, _ = await server.visitor()
    await still_alive(other)


async def test_flood_from_one_connection_error_then_close_others_unaffected(server_factory):
    server = await server_factory(rate_per_s=5.0, rate_burst=20)
    flooder, _ = await server.visitor()
    bystander, _ = await server.visitor()
    for i in range(1000):
        try:
            await flooder.send({"type": "message", "id": f"f{i}", "text": "spam"})
        except ConnectionClosed:
            break
    errors = []
    code = None
    try:
        while True:
            f = await flooder.recv()
            if f.get("type") == "error":
                errors.append(f["code"])
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd else 1006
    assert code == 4029
    assert errors and errors[0] == "rate_limited"
    acks = [f for f in flooder.frames if f.get("type") == "ack"]
    assert 15 <= len(acks) <= 25        # the burst, not the flood, was stored
    ack = await bystander.message("still fine")
    assert ack["type"] == "ack"


async def test_typing_at_100hz_is_cut_off(server_factory):
    server = await server_factory(rate_per_s=5.0, rate_burst=20)
    client, _ = await server.visitor()
    for i in range(400):
        try:
            await client.send({"type": "typing", "on": bool(i % 2)})
        except ConnectionClosed:
            break
    assert await closed_with(client) == 4029


async def test_new_conversations_per_ip_are_capped(server_factory):
    server = await server_factory(new_conversations_per_ip_per_min=3)
    for _ in range(3):
        await server.visitor()
    client = await server.connect("/ws/visitor")
    await client.send({"type": "hello", "bot": "testbot"})
    err = await client.expect("error")
    assert err["code"] == "rate_limited"
    assert await closed_with(client) == 4029


async def test_sockets_per_ip_are_capped(server_factory):
    from websockets.exceptions import InvalidStatus
    import pytest

    server = await server_factory(max_connections_per_ip=3)
    clients = [await server.connect("/ws/visitor") for _ in range(3)]
    with pytest.raises(InvalidStatus) as info:
        await server.connect("/ws/visitor")
    assert info.value.response.status_code == 429
    await clients[0].close()
    for _ in range(50):   # the server notices the close; wait on its registry, not the clock
        if await server.ctx.caps.count("127.0.0.1") < 3:
            break
        await asyncio.sleep(0.02)
    again = await server.connect("/ws/visitor")
    await again.close()


async def test_protocol_garbage_bad_opcode_closes_1002(server):
    raw = await RawSocket.open(server.port, "/ws/visitor")
    await raw.send_frame(b"junk", opcode=3)      # reserved opcode
    assert await raw.close_code() == 1002
    raw.close()
    other, _ = await server.visitor()
    await still_alive(other)


async def test_filters_are_allow_listed_against_injection(server):
    _, vw = await server.visitor()
    for query in ("state=%27%20OR%201%3D1--", "state=bot%25", "limit=-1", "limit=1;DROP", "before=abc"):
        status, data = await server.http("GET", f"/api/v1/conversations?{query}", token=vw["token"])
        assert status == 400, query
    status, data = await server.http("GET", "/api/v1/conversations/%27%20OR%20%271%27%3D%271", token=vw["token"])
    assert status == 404
