"""Teams (THREATS.md row 14): a conversation belongs to its bot's team (``[server] bot_teams``);
it is assigned and offered only to that team's agents, another team's agent can neither read
nor accept it, and a cross-team transfer is refused with ``forbidden`` and an audit entry.

Here the test bot belongs to team "sales"; "sam" and "sue" are sales agents, "dora" is in the
"default" team.  One rule per test, on a real server with real sockets.
"""
from __future__ import annotations

import logging
import uuid

import pytest
from engine import ConfigError

from server.config import bot_teams
from server.auth import hash_password

from .conftest import metric


def is_event(name):
    return lambda f: f.get("type") == "message" and f.get("kind") == "event" and f["meta"].get("event") == name


@pytest.fixture
async def teams(server_factory):
    server = await server_factory(bot_teams={"testbot": "sales"})
    storage = server.ctx.storage
    for name, team, capacity in (("sam", "sales", 1), ("sue", "sales", 2), ("dora", "default", 5)):
        await storage.add_agent(name, hash_password("password123"), capacity=capacity,
                                display_name=name.title(), team=team)
    return server


async def handoff(server):
    visitor, welcome = await server.visitor()
    await visitor.send({"type": "handoff"})
    return visitor, welcome["conversation"]["id"]


async def quiet(client, pred, timeout: float = 0.5) -> None:
    """No frame matching ``pred`` arrives within ``timeout`` (and none was skipped before)."""
    assert not any(pred(f) for f in client.frames), client.frames
    with pytest.raises(AssertionError):
        await client.expect(pred, timeout=timeout)


async def error_for(client, frame):
    cid = uuid.uuid4().hex
    await client.send({**frame, "id": cid})
    return await client.expect(lambda f: f.get("type") == "error" and f.get("id") == cid)


async def test_assignment_stays_within_team(teams):
    dora, _ = await teams.agent("dora")              # idle, capacity 5, other team
    sue, welcome = await teams.agent("sue")          # sales, capacity 2
    assert welcome["agent"]["team"] == "sales"
    _, cid1 = await handoff(teams)
    assert (await sue.expect("assigned"))["conversation"]["id"] == cid1
    _, cid2 = await handoff(teams)                   # least-loaded overall would be dora
    assert (await sue.expect("assigned"))["conversation"]["id"] == cid2
    await quiet(dora, lambda f: f.get("type") == "assigned")
    assert await teams.ctx.router.load("dora") == 0


async def test_no_agent_of_the_team_online_is_unavailable(teams):
    dora, _ = await teams.agent("dora")
    visitor, cid = await handoff(teams)
    ev = await visitor.expect(is_event("unavailable"))
    assert ev["meta"]["reason"] == "no_agents_online"
    await quiet(dora, lambda f: f.get("type") == "assigned")
    sam, _ = await teams.agent("sam")                # the team's agent comes: it is offered to them
    assert (await sam.expect("assigned"))["conversation"]["id"] == cid


async def test_queued_conversation_offered_only_to_its_team(teams):
    sam, _ = await teams.agent("sam")                # capacity 1
    _, cid1 = await handoff(teams)
    await sam.expect("assigned")
    dora, dora_welcome = await teams.agent("dora")
    visitor2, cid2 = await handoff(teams)
    ev = await visitor2.expect(is_event("queued"))
    assert ev["meta"]["position"] == 1
    q = await sam.expect(lambda f: f.get("type") == "queue" and f["conversations"])
    assert q["conversations"] == [cid2]
    assert dora_welcome["queue"] == []
    await quiet(dora, lambda f: f.get("type") == "assigned" or cid2 in f.get("conversations", ()))
    # a sales slot frees up: the queue goes to sam, never to idle dora
    await sam.send({"type": "close", "conversation": cid1})
    assert (await sam.expect("assigned"))["conversation"]["id"] == cid2
    await quiet(dora, lambda f: f.get("type") == "assigned")


async def test_agent_cannot_read_another_teams_queued_conversation(teams):
    sam, _ = await teams.agent("sam")
    _, cid1 = await handoff(teams)
    await sam.expect("assigned")
    visitor2, cid2 = await handoff(teams)
    await visitor2.expect(is_event("queued"))
    dora = await teams.login("dora")
    for path in (f"/api/v1/conversations/{cid2}", f"/api/v1/conversations/{cid2}/messages"):
        status, data = await teams.http("GET", path, token=dora)
        assert status == 404 and data["error"]["code"] == "not_found"
    status, unknown = await teams.http("GET", "/api/v1/conversations/" + "0" * 32, token=dora)
    assert status == 404 and unknown == data                # indistinguishable from an unknown id
    status, data = await teams.http("GET", "/api/v1/conversations?state=queued", token=dora)
    assert status == 200 and data["conversations"] == []
    status, data = await teams.http("GET", "/api/v1/agents", token=dora)
    assert status == 200 and data["queue"] == []
    assert teams.ctx.metrics.value("kefu_audit_total", action="read") == 2
    sue = await teams.login("sue")                          # the same team may read it
    status, data = await teams.http("GET", f"/api/v1/conversations/{cid2}", token=sue)
    assert status == 200 and data["id"] == cid2
    status, data = await teams.http("GET", "/api/v1/conversations?state=queued", token=sue)
    assert [c["id"] for c in data["conversations"]] == [cid2]


async def test_agent_cannot_accept_another_teams_conversation(teams, caplog):
    caplog.set_level(logging.INFO, logger="kefu.audit")
    sam, _ = await teams.agent("sam")
    _, cid1 = await handoff(teams)
    await sam.expect("assigned")
    visitor2, cid2 = await handoff(teams)
    await visitor2.expect(is_event("queued"))
    dora, _ = await teams.agent("dora")
    err = await error_for(dora, {"type": "accept", "conversation": cid2})
    assert err["code"] == "forbidden"
    records = [r for r in caplog.records if r.name == "kefu.audit"]
    assert len(records) == 1 and records[0].audit["action"] == "accept"
    assert records[0].audit["agent"] == (await teams.ctx.storage.get_agent(username="dora")).id
    assert records[0].audit["conversation"] == cid2
    assert teams.ctx.metrics.value("kefu_audit_total", action="accept") == 1
    assert await teams.ctx.router.queue() == [cid2]               # still waiting for its team
    assert (await teams.ctx.storage.get_conversation(cid2)).state == "queued"


async def test_cross_team_transfer_refused_and_audited(teams, caplog):
    caplog.set_level(logging.INFO, logger="kefu.audit")
    sam, welcome = await teams.agent("sam")
    sam_id = welcome["agent"]["id"]
    _, cid = await handoff(teams)
    await sam.expect("assigned")
    dora, dora_welcome = await teams.agent("dora")
    dora_id = dora_welcome["agent"]["id"]
    err = await error_for(sam, {"type": "transfer", "conversation": cid, "to": dora_id})
    assert err["code"] == "forbidden"
    records = [r for r in caplog.records if r.name == "kefu.audit"]
    assert len(records) == 1
    assert records[0].audit == {"action": "transfer", "agent": sam_id, "conversation": cid,
                                "outcome": "refused", "to": dora_id, "to_team": "default",
                                "conversation_team": "sales"}
    assert f"agent={sam_id}" in records[0].getMessage() and cid in records[0].getMessage()
    assert teams.ctx.metrics.value("kefu_audit_total", action="transfer") == 1
    status, text = await teams.http("GET", "/metrics")
    assert metric(text, "kefu_audit_total", action="transfer") == 1
    conv = await teams.ctx.storage.get_conversation(cid)
    assert conv.state == "human" and conv.agent_id == sam_id
    await quiet(dora, lambda f: f.get("type") == "assigned")
    ack = await sam.message("still with you", conversation=cid)
    assert ack["type"] == "ack"


async def test_transfer_within_team_still_works(teams):
    sam, _ = await teams.agent("sam")
    _, cid = await handoff(teams)
    await sam.expect("assigned")
    sue, sue_welcome = await teams.agent("sue")
    await sam.send({"type": "transfer", "conversation": cid, "to": sue_welcome["agent"]["id"]})
    assert (await sue.expect("assigned"))["conversation"]["id"] == cid
    assert teams.ctx.metrics.value("kefu_audit_total", action="transfer") == 0


def test_bot_teams_config_is_a_table_of_strings():
    assert bot_teams({}) == {} and bot_teams("") == {}
    assert bot_teams({"shop": "sales"}) == {"shop": "sales"}
    for bad in ("sales", {"shop": 3}, {"shop": ""}):
        with pytest.raises(ConfigError):
            bot_teams(bad)
