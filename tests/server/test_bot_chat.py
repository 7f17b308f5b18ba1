"""A visitor talks to the bot over a real WebSocket."""
from __future__ import annotations

import asyncio

import msgpack
import pytest

from engine import hookimpl

from . import testbot
from .conftest import Client


async def test_visitor_gets_greeting_ack_and_bot_answer(server):
    client, welcome = await server.visitor()
    conv = welcome["conversation"]
    assert conv["state"] == "bot" and conv["bot"] == "testbot"
    assert welcome["token"] and welcome["visitor"].startswith("v")
    greeting = await client.expect("message")
    assert greeting["role"] == "bot" and greeting["kind"] == "greeting" and greeting["seq"] == 1
    ack = await client.message("when are you open")
    assert ack["type"] == "ack" and ack["seq"] == 2 and ack["duplicate"] is False
    typing = await client.expect("typing")
    assert typing["role"] == "bot" and typing["on"] is True
    reply = await client.expect("message")
    assert reply["role"] == "bot" and reply["text"] == "We are open 9 to 5." and reply["seq"] == 3
    assert reply["meta"]["intent"] == "opening_hours"
    await client.close()


async def test_msgpack_subprotocol(server):
    ws = await server.connect("/ws/visitor", subprotocols=["kefu.msgpack"])
    assert ws.ws.subprotocol == "kefu.msgpack"
    await ws.send(msgpack.packb({"type": "hello", "bot": "testbot"}))
    welcome = await ws.expect("welcome")
    assert welcome["conversation"]["state"] == "bot"
    await ws.send(msgpack.packb({"type": "message", "id": "m1", "text": "hi"}))
    ack = await ws.expect("ack")
    assert ack["id"] == "m1" and ack["seq"] == 2
    reply = await ws.expect(lambda f: f.get("type") == "message" and f["seq"] == 3)
    assert reply["text"] == "Hi! testbot here."
    await ws.close()


async def test_type_ahead_suggestions(server):
    client, welcome = await server.visitor()
    assert "suggest" in welcome["features"]
    await client.send({"type": "suggest", "prefix": "what is the mean"})
    got = await client.expect("suggestions")
    assert got["prefix"] == "what is the mean" and got["items"] and got["items"][0].lower().startswith("what is the mean")
    await client.send({"type": "suggest", "prefix": ""})
    assert (await client.expect("suggestions"))["items"] == []


async def test_a_reply_still_typing_at_shutdown_is_stored_for_the_visitor(server_factory, tmp_path):
    """Rule: stopping the server (a deploy) does not lose the bot's answer to a message it
    acknowledged: the typing pause is cut short and the reply stored, so the visitor finds it
    on resume after the restart."""
    asked = asyncio.Event()

    class SlowTyping:
        @hookimpl
        def reply_delay(self, reply, bot, context):
            asked.set()
            return 600.0                      # far longer than any shutdown waits

    data = tmp_path / "data"
    server = await server_factory(plugins=(testbot, SlowTyping()), data_dir=data)
    client, welcome = await server.visitor()
    conv = welcome["conversation"]["id"]
    await client.message("when are you open")
    await asyncio.wait_for(asked.wait(), 5)   # the turn has its reply and starts to "type"
    await server.stop()
    again = await server_factory(data_dir=data)
    stored = await again.ctx.storage.messages(conv)
    assert [(m.role, m.text) for m in stored][-2:] == [("visitor", "when are you open"),
                                                        ("bot", "We are open 9 to 5.")]


async def test_clients_are_told_the_server_is_going_away_at_shutdown(server_factory):
    """Rule: a stopping server closes sockets with 1001 (docs/protocol.md: reconnect with
    backoff), not the 1000 "normal closure" Sanic would send, which a client may take as final."""
    from websockets.exceptions import ConnectionClosed

    server = await server_factory()
    client, _ = await server.visitor()
    stopping = asyncio.ensure_future(server.stop())
    try:
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await client.recv()
    finally:
        await stopping
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


async def test_a_bot_reply_the_database_refuses_is_retried_then_the_visitor_is_told_and_handed_off(server,
                                                                                                   monkeypatch):
    """Rule: a bot reply that cannot be stored never vanishes silently: it is retried; still
    refused, the visitor gets a notice in the bot's language, the conversation is handed to a
    person, and the failure is counted."""
    from server.storage.base import StorageError

    hub, real = server.ctx.hub, server.ctx.hub.append
    tries = []

    async def failing_append(c, *, role, **kw):
        if role == "bot":
            tries.append(kw.get("client_id"))
            raise StorageError("database is locked")
        return await real(c, role=role, **kw)

    visitor, vw = await server.visitor()
    await visitor.expect("message")                     # greeting (stored before the failure)
    monkeypatch.setattr(hub, "append", failing_append)
    await visitor.message("hi")
    note = await visitor.expect("notice")
    assert note["text"] == "Sorry, I could not answer that just now. Let me find a person for you."
    ev = await visitor.expect(lambda f: f.get("type") == "message" and f.get("kind") == "event")
    assert ev["meta"]["event"] == "unavailable" and ev["meta"]["state"] == "queued"    # nobody online: it waits
    assert len(tries) == 3 and len(set(tries)) == 1     # one client id: a retry never stores twice
    assert server.ctx.metrics.value("kefu_bot_turns_total", outcome="store_failed") == 1


async def test_a_bot_reply_stored_on_a_retry_reaches_the_visitor_once(server, monkeypatch):
    """Rule: a database failing for a moment costs the bot's reply nothing: the retry stores it,
    once."""
    from server.storage.base import StorageError

    hub, real = server.ctx.hub, server.ctx.hub.append
    failed = []

    async def flaky_append(c, *, role, **kw):
        if role == "bot" and not failed:
            failed.append(1)
            raise StorageError("database is locked")
        return await real(c, role=role, **kw)

    visitor, vw = await server.visitor()
    await visitor.expect("message")
    monkeypatch.setattr(hub, "append", flaky_append)
    await visitor.message("hi")
    answer = await visitor.expect(lambda f: f.get("type") == "message" and f["role"] == "bot")
    assert answer["seq"] == 3 and failed == [1]
    assert server.ctx.metrics.value("kefu_bot_turns_total", outcome="answered") == 1
