"""Stored before acked, idempotent resends, resume without gap or duplicate, crash recovery."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .conftest import ORIGIN, Client, free_socket, http_request

ROOT = Path(__file__).resolve().parents[2]


def is_event(name):
    return lambda f: f.get("type") == "message" and f.get("kind") == "event" and f["meta"].get("event") == name


async def _with_agent(server, name="ann"):
    await server.add_agent(name, capacity=5)
    agent, _ = await server.agent(name)
    visitor, vw = await server.visitor()
    cid = vw["conversation"]["id"]
    await visitor.send({"type": "handoff"})
    await agent.expect("assigned")
    last = (await visitor.expect(is_event("assigned")))["seq"]
    return agent, visitor, vw, cid, last


async def test_idempotent_resend_over_two_connections(server):
    agent, visitor, vw, cid, _ = await _with_agent(server)
    second, _ = await server.visitor(token=vw["token"], conversation=cid, last_seq=99)
    cid_msg = uuid.uuid4().hex
    a1 = await visitor.message("only once", cid=cid_msg)
    a2 = await second.message("only once", cid=cid_msg)
    a3 = await visitor.message("only once", cid=cid_msg)
    assert a1["seq"] == a2["seq"] == a3["seq"]
    assert (a1["duplicate"], a2["duplicate"], a3["duplicate"]) == (False, True, True)
    await agent.message("marker", conversation=cid)
    await visitor.expect(lambda f: f.get("text") == "marker")
    seen = [f for f in agent.frames if f.get("type") == "message" and f.get("text") == "only once"]
    assert len(seen) == 1
    status, data = await server.http("GET", f"/api/v1/conversations/{cid}/messages", token=vw["token"])
    assert [m["text"] for m in data["messages"]].count("only once") == 1


async def test_resume_after_disconnect_no_gap_no_duplicate(server):
    agent, visitor, vw, cid, last = await _with_agent(server)
    await visitor.close()
    for i in range(5):
        await agent.message(f"while away {i}", conversation=cid)
    again, welcome = await server.visitor(token=vw["token"], conversation=cid, last_seq=last)
    assert welcome["conversation"]["id"] == cid and welcome["visitor"] == vw["visitor"]
    got = [await again.expect("message") for _ in range(5)]
    assert [m["text"] for m in got] == [f"while away {i}" for i in range(5)]
    assert [m["seq"] for m in got] == list(range(last + 1, last + 6))
    await agent.message("after resume", conversation=cid)
    nxt = await again.expect("message")
    assert nxt["text"] == "after resume" and nxt["seq"] == last + 6


async def test_resume_while_peer_keeps_sending(server):
    agent, visitor, vw, cid, last = await _with_agent(server)
    total = 40
    sent_seqs: list[int] = []

    async def agent_sends():
        for i in range(total):
            ack = await agent.message(f"m{i}", conversation=cid)
            sent_seqs.append(ack["seq"])

    task = asyncio.create_task(agent_sends())
    first = []
    while len(first) < 10:
        f = await visitor.expect("message")
        first.append(f["seq"])
    await visitor.close()
    again, _ = await server.visitor(token=vw["token"], conversation=cid, last_seq=first[-1])
    await task
    second = []
    while not second or second[-1] < sent_seqs[-1]:
        second.append((await again.expect("message"))["seq"])
    assert second == list(range(first[-1] + 1, sent_seqs[-1] + 1))   # in order, no gap, no duplicate


async def test_beyond_retention_is_explicitly_not_recovered(server_factory):
    server = await server_factory(resume_max_messages=5)
    agent, visitor, vw, cid, last = await _with_agent(server)
    await visitor.close()
    for i in range(8):
        await agent.message(f"x{i}", conversation=cid)
    again, _ = await server.visitor(token=vw["token"], conversation=cid, last_seq=last)
    resync = await again.expect(lambda f: f.get("type") in ("resync", "message"))
    assert resync["type"] == "resync" and resync["reason"] == "not_recovered" and resync["last_seq"] == last + 8
    # the full reload is over REST, paged
    status, page = await server.http("GET", f"/api/v1/conversations/{cid}/messages?after={last}&limit=5",
                                     token=vw["token"])
    assert status == 200 and len(page["messages"]) == 5 and page["next_after"] == last + 5


async def _wait_health(port: int, proc: subprocess.Popen) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            status, _ = await http_request(port, "GET", "/healthz")
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.05)   # polling a starting process: there is no event to wait on
    raise AssertionError("server did not start")


def _spawn(data_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests.server.serve_testbot", str(data_dir), str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.timeout(120)
async def test_sigkill_mid_burst_every_acked_message_once_seqs_contiguous(tmp_path):
    from websockets.asyncio.client import connect

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = _spawn(tmp_path / "data", port)
    try:
        await _wait_health(port, proc)
        clients = []
        for _ in range(8):
            ws = Client(await connect(f"ws://127.0.0.1:{port}/ws/visitor", origin=ORIGIN))
            await ws.send({"type": "hello", "bot": "testbot"})
            welcome = await ws.expect("welcome")
            await ws.send({"type": "handoff"})
            await ws.expect(is_event("unavailable"))   # nobody online: messages are just stored
            clients.append((ws, welcome))
        acked: dict[str, dict[str, int]] = {w["conversation"]["id"]: {} for _, w in clients}
        sent: dict[str, list[str]] = {w["conversation"]["id"]: [] for _, w in clients}
        enough = asyncio.Event()

        async def blast(ws: Client, cid: str):
            async def reader():
                try:
                    while True:
                        f = await ws.recv(30)
                        if f.get("type") == "ack":
                            acked[cid][f["id"]] = f["seq"]
                            if sum(len(a) for a in acked.values()) >= 400:
                                enough.set()
                except Exception:
                    return
            rtask = asyncio.create_task(reader())
            try:
                for i in range(100000):
                    mid = f"{cid[:6]}-{i}"
                    sent[cid].append(mid)
                    await ws.send({"type": "message", "id": mid, "text": f"burst {i}"})
                    if i % 20 == 19:
                        await asyncio.sleep(0)
            except Exception:
                pass
            await rtask

        tasks = [asyncio.create_task(blast(ws, w["conversation"]["id"])) for ws, w in clients]
        await asyncio.wait_for(enough.wait(), 60)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        await asyncio.gather(*tasks)
        total_acked = sum(len(a) for a in acked.values())
        assert total_acked >= 400

        proc = _spawn(tmp_path / "data", port)
        await _wait_health(port, proc)
        for ws, welcome in clients:
            cid, token = welcome["conversation"]["id"], welcome["token"]
            stored, after = [], 0
            while True:
                status, page = await http_request(port, "GET", f"/api/v1/conversations/{cid}/messages?after={after}&limit=200",
                                                  token=token)
                assert status == 200, page
                stored.extend(page["messages"])
                if page["next_after"] is None:
                    break
                after = page["next_after"]
            seqs = [m["seq"] for m in stored]
            assert seqs == list(range(1, len(seqs) + 1))                       # contiguous
            ids = [m["client_id"] for m in stored if m["client_id"]]
            assert len(ids) == len(set(ids))                                    # nothing twice
            by_id = {m["client_id"]: m["seq"] for m in stored if m["client_id"]}
            for mid, seq in acked[cid].items():
                assert by_id.get(mid) == seq                                    # every ack kept
            # the client reconnects and resends what was not acknowledged: stored once each
            again = Client(await connect(f"ws://127.0.0.1:{port}/ws/visitor", origin=ORIGIN))
            await again.send({"type": "hello", "token": token, "conversation": cid, "last_seq": seqs[-1]})
            await again.expect("welcome")
            unacked = [m for m in sent[cid] if m not in acked[cid]][:5]
            for mid in unacked:
                ack = await again.message("burst again", cid=mid)
                assert ack["type"] == "ack"
                if mid in by_id:
                    assert ack["duplicate"] and ack["seq"] == by_id[mid]
            await again.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


async def test_storage_failure_means_no_ack_and_a_visible_error(server):
    from server.storage import StorageError

    client, welcome = await server.visitor()
    storage = server.ctx.storage
    real_append = storage.append

    async def failing_append(*args, **kwargs):
        raise StorageError("disk full")

    storage.append = failing_append
    try:
        err = await client.message("will this be kept?", cid="keep-1")
        assert err["type"] == "error" and err["code"] == "storage_unavailable" and err["id"] == "keep-1"
        assert not any(f.get("type") == "ack" and f.get("id") == "keep-1" for f in client.frames)
        # reads still work
        status, _ = await server.http("GET", f"/api/v1/conversations/{welcome['conversation']['id']}",
                                      token=welcome["token"])
        assert status == 200
    finally:
        storage.append = real_append
    ack = await client.message("will this be kept?", cid="keep-1")   # recovery: the retry is stored once
    assert ack["type"] == "ack" and ack["duplicate"] is False
