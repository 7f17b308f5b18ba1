"""Bot -> handoff -> agent, least-loaded routing, the queue, offline messages, transfer, close."""
from __future__ import annotations

import asyncio

import pytest


def is_event(name):
    return lambda f: f.get("type") == "message" and f.get("kind") == "event" and f["meta"].get("event") == name


async def test_visitor_bot_handoff_agent_reply_end_to_end(server):
    await server.add_agent("alice", capacity=2)
    agent, welcome = await server.agent("alice")
    assert welcome["agent"]["username"] == "alice" and welcome["conversations"] == []

    visitor, vw = await server.visitor()
    cid = vw["conversation"]["id"]
    await visitor.expect("message")                       # greeting
    assert (await visitor.message("hi"))["seq"] == 2
    await visitor.expect(lambda f: f.get("type") == "message" and f["seq"] == 3)
    await visitor.message("talk to a human")              # the bot's handoff rule
    handoff_reply = await visitor.expect(lambda f: f.get("type") == "message" and f.get("kind") == "handoff")
    assert handoff_reply["role"] == "bot"
    assigned_ev = await visitor.expect(is_event("assigned"))
    assert assigned_ev["meta"]["agent"]["name"] == "Alice" and assigned_ev["meta"]["state"] == "human"

    assigned = await agent.expect("assigned")
    assert assigned["conversation"]["id"] == cid and assigned["conversation"]["state"] == "human"
    transcript = []
    while len(transcript) < 6:   # greeting, hi, answer, talk to a human, handoff reply, assigned event
        f = await agent.expect("message")
        transcript.append(f)
    assert [m["seq"] for m in transcript] == [1, 2, 3, 4, 5, 6]
    assert [m["role"] for m in transcript[:5]] == ["bot", "visitor", "bot", "visitor", "bot"]

    ack = await agent.message("Hello, Alice here. How can I help?", conversation=cid)
    assert ack["type"] == "ack"
    got = await visitor.expect(lambda f: f.get("type") == "message" and f["role"] == "agent")
    assert got["text"] == "Hello, Alice here. How can I help?" and got["meta"]["name"] == "Alice"

    # the bot no longer answers; the agent gets the visitor's messages
    await visitor.message("my parcel is late")
    got = await agent.expect(lambda f: f.get("type") == "message" and f["role"] == "visitor")
    assert got["text"] == "my parcel is late"
    await visitor.send({"type": "typing", "on": True})
    t = await agent.expect("typing")
    assert t["role"] == "visitor" and t["on"] is True
    await agent.send({"type": "read", "conversation": cid, "seq": got["seq"]})
    r = await visitor.expect("read")
    assert r["role"] == "agent" and r["seq"] == got["seq"]
    assert not any(f.get("role") == "bot" and f["seq"] > 6 for f in visitor.frames if f.get("type") == "message")

    await agent.send({"type": "close", "conversation": cid})
    await visitor.expect(is_event("closed"))
    un = await agent.expect("unassigned")
    assert un["reason"] == "closed"
    err = await visitor.message("hello?")
    assert err["type"] == "error" and err["code"] == "bad_state"


async def test_visitor_asks_for_person_by_frame(server):
    await server.add_agent("bob")
    agent, _ = await server.agent("bob")
    visitor, vw = await server.visitor()
    await visitor.send({"type": "handoff"})
    await visitor.expect(is_event("assigned"))
    assigned = await agent.expect("assigned")
    assert assigned["conversation"]["id"] == vw["conversation"]["id"]


async def test_least_loaded_with_capacities_then_queue_then_offer(server):
    await server.add_agent("a1", capacity=1)
    await server.add_agent("a2", capacity=2)
    a1, _ = await server.agent("a1")
    a2, _ = await server.agent("a2")
    owners = []
    visitors = []
    for i in range(3):
        v, vw = await server.visitor()
        visitors.append((v, vw["conversation"]["id"]))
        await v.send({"type": "handoff"})
        ev = await v.expect(is_event("assigned"))
        owners.append(ev["meta"]["agent"]["name"])
    # a1 (cap 1) and a2 (cap 2): the three go a1/a2 alternately by load, then a2
    assert sorted(owners) == ["A1", "A2", "A2"]
    # both full: the fourth is queued at position 1
    v4, vw4 = await server.visitor()
    await v4.send({"type": "handoff"})
    q = await v4.expect(is_event("queued"))
    assert q["meta"]["position"] == 1 and q["meta"]["state"] == "queued"
    # a1 closes its conversation: the queued one is offered to a1
    a1_conv = next(cid for (v, cid), name in zip(visitors, owners) if name == "A1")
    await a1.send({"type": "close", "conversation": a1_conv})
    ev = await v4.expect(is_event("assigned"))
    assert ev["meta"]["agent"]["name"] == "A1"
    got = await a1.expect(lambda f: f.get("type") == "assigned" and f["conversation"]["id"] == vw4["conversation"]["id"])
    assert got


async def test_offline_message_seen_by_agent_later(server):
    visitor, vw = await server.visitor()
    cid = vw["conversation"]["id"]
    await visitor.send({"type": "handoff"})
    ev = await visitor.expect(is_event("unavailable"))
    assert ev["meta"]["reason"] == "no_agents_online" and ev["meta"]["available"] is False
    await visitor.message("please call me back on 0123")
    # no bot answer to that: the conversation is waiting for a person
    await server.add_agent("carol")
    token = await server.login("carol")
    status, data = await server.http("GET", "/api/v1/conversations?state=queued", token=token)
    assert status == 200 and [c["id"] for c in data["conversations"]] == [cid]
    status, data = await server.http("GET", f"/api/v1/conversations/{cid}/messages", token=token)
    assert status == 200 and data["messages"][-1]["text"] == "please call me back on 0123"
    # when carol connects, the waiting conversation is offered to her with the whole transcript
    agent, _ = await server.agent("carol")
    assigned = await agent.expect("assigned")
    assert assigned["conversation"]["id"] == cid
    texts = [(await agent.expect("message"))["text"] for _ in range(4)]
    assert "please call me back on 0123" in texts
    assert not any(f.get("role") == "bot" and f["seq"] > 1 for f in visitor.frames if f.get("type") == "message")


async def test_transfer_between_agents_visitor_told(server):
    await server.add_agent("dan")
    await server.add_agent("erin")
    dan, _ = await server.agent("dan")
    visitor, vw = await server.visitor()
    cid = vw["conversation"]["id"]
    await visitor.send({"type": "handoff"})
    await dan.expect("assigned")
    erin, erin_welcome = await server.agent("erin")
    erin_id = erin_welcome["agent"]["id"]
    await dan.send({"type": "transfer", "conversation": cid, "to": erin_id})
    un = await dan.expect("unassigned")
    assert un["reason"] == "transferred" and un["to"] == erin_id
    got = await erin.expect("assigned")
    assert got["conversation"]["id"] == cid and got["previous_agent"]
    ev = await visitor.expect(is_event("transferred"))
    assert ev["meta"]["agent"]["name"] == "Erin"
    # dan can no longer write there: foreign -> not_found
    err = await dan.message("still here?", conversation=cid)
    assert err["type"] == "error" and err["code"] == "not_found"
    ack = await erin.message("Erin here", conversation=cid)
    assert ack["type"] == "ack"
    await visitor.expect(lambda f: f.get("type") == "message" and f["text"] == "Erin here")


async def test_bot_that_hangs_hands_off_after_timeout(server_factory):
    server = await server_factory(bot_timeout_s=0.5)
    await server.add_agent("fay")
    agent, _ = await server.agent("fay")
    visitor, vw = await server.visitor()
    await visitor.message("please hang forever")
    ev = await visitor.expect(is_event("assigned"))
    assert ev["meta"]["state"] == "human"
    await agent.expect("assigned")
    assert server.ctx.metrics.value("kefu_bot_turns_total", outcome="timeout") == 1
    # the conversation is not stuck: the visitor can write, the agent reads it
    await visitor.message("hello?")
    got = await agent.expect(lambda f: f.get("type") == "message" and f["text"] == "hello?")
    assert got["role"] == "visitor"


async def test_agent_disconnect_grace_then_requeue_to_other_agent(server_factory):
    server = await server_factory(grace_s=0.5)
    await server.add_agent("gus", capacity=1)
    await server.add_agent("hal", capacity=1)
    gus, _ = await server.agent("gus")
    visitor, vw = await server.visitor()
    await visitor.send({"type": "handoff"})
    await gus.expect("assigned")
    hal, _ = await server.agent("hal")
    await gus.close()
    # after the grace period the conversation goes to hal
    got = await hal.expect("assigned", timeout=10)
    assert got["conversation"]["id"] == vw["conversation"]["id"]
    ev = await visitor.expect(lambda f: f.get("type") == "message" and f["meta"].get("event") in ("assigned", "transferred")
                              and f["meta"]["agent"]["name"] == "Hal", timeout=10)
    assert ev


async def test_two_tabs_of_one_agent_both_work(server):
    await server.add_agent("ivy")
    tab1, _ = await server.agent("ivy")
    tab2, _ = await server.agent("ivy")
    visitor, vw = await server.visitor()
    cid = vw["conversation"]["id"]
    await visitor.send({"type": "handoff"})
    await tab1.expect("assigned")
    await tab2.expect("assigned")
    await tab1.message("from tab 1", conversation=cid)
    await visitor.expect(lambda f: f.get("text") == "from tab 1")
    await tab2.expect(lambda f: f.get("text") == "from tab 1")
    await tab2.message("from tab 2", conversation=cid)
    await tab1.expect(lambda f: f.get("text") == "from tab 2")


async def test_away_agent_gets_no_new_conversations_and_capacity_frame(server):
    await server.add_agent("jo", capacity=1)
    await server.add_agent("kai", capacity=1)
    jo, _ = await server.agent("jo")
    kai, kai_welcome = await server.agent("kai")
    await jo.send({"type": "presence", "status": "away"})
    assert (await jo.expect("presence"))["status"] == "away"
    visitor, _ = await server.visitor()
    await visitor.send({"type": "handoff"})
    ev = await visitor.expect(is_event("assigned"))
    assert ev["meta"]["agent"]["name"] == "Kai"
    # kai is full and jo away: the next one waits; raising kai's capacity offers it to kai
    v2, vw2 = await server.visitor()
    await v2.send({"type": "handoff"})
    assert (await v2.expect(is_event("queued")))["meta"]["position"] == 1
    await kai.send({"type": "capacity", "value": 2})
    got = await kai.expect(lambda f: f.get("type") == "assigned" and f["conversation"]["id"] == vw2["conversation"]["id"])
    assert got
    assert (await kai.expect("capacity"))["value"] == 2
    agent = await server.ctx.storage.get_agent(agent_id=kai_welcome["agent"]["id"])
    assert agent.capacity == 2
    await jo.send({"type": "presence", "status": "sleeping"})
    assert (await jo.expect("error"))["code"] == "bad_field"


async def test_a_handoff_whose_caller_is_cancelled_still_queues_the_conversation(server, monkeypatch):
    """Rule: a handoff runs to its end when the visitor's socket closes meanwhile (its handler is
    cancelled): the conversation is stored as queued, where agents will see it, not left
    ``bot`` in storage while the server has stopped the bot for it."""
    visitor, vw = await server.visitor()
    cid = vw["conversation"]["id"]
    bots, router = server.ctx.bots, server.ctx.router
    c = await server.ctx.hub.get(cid)
    routing, go_on = asyncio.Event(), asyncio.Event()
    real = router.request_human

    async def slow_request_human(conversation_id):
        routing.set()
        await go_on.wait()
        return await real(conversation_id)

    monkeypatch.setattr(router, "request_human", slow_request_human)
    caller = asyncio.ensure_future(bots.handoff(c, "asked"))
    await routing.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    go_on.set()
    ev = await visitor.expect(is_event("unavailable"))     # nobody online: it waits, stored
    assert ev["meta"]["state"] == "queued"
    assert (await server.ctx.storage.get_conversation(cid)).state == "queued"


async def test_an_agent_may_answer_as_soon_as_assigned_arrives(server, monkeypatch):
    """Rule: the agent owns the conversation from the ``assigned`` frame on; a reply sent before
    the transcript's replay has finished is stored and delivered, not refused as not_found."""
    await server.add_agent("quick")
    agent, _ = await server.agent("quick")
    hub, real = server.ctx.hub, server.ctx.hub.subscribe
    replaying, go_on = asyncio.Event(), asyncio.Event()

    async def slow_subscribe(conn, c, after_seq):
        if conn.kind == "agent":
            replaying.set()
            await go_on.wait()
        return await real(conn, c, after_seq)

    monkeypatch.setattr(hub, "subscribe", slow_subscribe)
    visitor, vw = await server.visitor()
    cid = vw["conversation"]["id"]
    await visitor.send({"type": "handoff"})
    await agent.expect(lambda f: f.get("type") == "assigned" and f["conversation"]["id"] == cid)
    await replaying.wait()
    ack = await agent.message("right away", conversation=cid)
    go_on.set()
    assert ack["type"] == "ack", ack
    got = await visitor.expect(lambda f: f.get("type") == "message" and f["role"] == "agent")
    assert got["text"] == "right away" and got["seq"] == ack["seq"]
