"""Several nodes and workers sharing one Redis and one database, each a real process.

Each test starts ``kefu serve`` processes (the test bot, ``tests/server/serve_testbot.py``) on
their own ports with the same ``redis_url`` (a key prefix of their own) and ``database_url``
(a database of their own on the PostgreSQL or MariaDB that CI starts), and talks to them over
real sockets: the visitor on one node, the agent on another.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from server.auth import hash_password
from server.storage import open_storage

from .conftest import Client, Server, drop_prefix, http_request, samples
from .redis_support import free_port
from .storage_support import MY_HOST, MY_PORT, MY_USER, PG_HOST, PG_PORT, my_execute, pg_execute, unique_name

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("KEFU_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

pytestmark = pytest.mark.timeout(180)


def is_event(name):
    return lambda f: f.get("type") == "message" and f.get("kind") == "event" and f["meta"].get("event") == name


def is_message(role=None, text=None):
    return lambda f: (f.get("type") == "message" and f.get("kind") == "text" and (role is None or f["role"] == role)
                      and (text is None or f["text"] == text))


# -- databases and Redis of a test's own ------------------------------------------------------

@pytest.fixture
async def database(request):
    """The URL of an empty database of this test's own (PostgreSQL unless the test asks)."""
    backend = getattr(request, "param", "postgresql")
    name = unique_name("kefu_so")
    if backend == "postgresql":
        user = await pg_execute("postgres", f'CREATE DATABASE "{name}"')
        yield f"postgresql+asyncpg://{user}@{PG_HOST}:{PG_PORT}/{name}"
        await pg_execute("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    else:
        await my_execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        yield f"mysql+asyncmy://{MY_USER}@{MY_HOST}:{MY_PORT}/{name}"
        await my_execute(f"DROP DATABASE IF EXISTS `{name}`")


# -- nodes ----------------------------------------------------------------------------------

class Node(Server):
    """A kefu process; the same client helpers as the in-process test server."""

    def __init__(self, name: str, port: int, proc: subprocess.Popen, log: Path) -> None:
        super().__init__(None, port)
        self.name, self.proc, self.log = name, proc, log

    async def health(self) -> dict[str, Any]:
        status, data = await http_request(self.port, "GET", "/healthz")
        return data

    async def metrics(self) -> str:
        _, text = await http_request(self.port, "GET", "/metrics")
        return text

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:     # type: ignore[override]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
async def cluster(tmp_path):
    """``start(name, database_url, redis_url, **settings)`` -> a running :class:`Node`."""
    nodes: list[Node] = []
    prefix = f"kefutest:{uuid.uuid4().hex[:12]}:"

    async def start(name: str, database_url: str, redis_url: str = REDIS_URL, **settings: Any) -> Node:
        port = free_port()
        settings = {"redis_url": redis_url, "redis_prefix": prefix, "database_url": database_url,
                    "node_id": name, "grace_s": 60.0, "presence_ttl_s": 10.0, "metrics_push_s": 0.5, **settings}
        log = tmp_path / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "tests.server.serve_testbot", str(tmp_path / name),
                                     str(port), json.dumps(settings)], cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        node = Node(name, port, proc, log)
        node.redis_url = redis_url
        nodes.append(node)
        workers = int(settings.get("workers", 1))
        for _ in range(1200):                 # a starting process: no event to wait on
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                seen = set()
                for _ in range(4 * workers):
                    health = await node.health()
                    if health and health.get("status") == "ok":
                        seen.add(health["node"])
                if len(seen) >= workers:
                    return node
            except (OSError, ValueError, IndexError):
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"{name} did not start: {log.read_text()[-3000:]}")

    yield start
    for node in nodes:
        node.stop()
    for url in {node.redis_url for node in nodes if node.redis_url == REDIS_URL}:
        await drop_prefix(url, prefix)


async def add_agent(database_url: str, username: str, capacity: int) -> Any:
    storage = await open_storage(database_url)
    try:
        return await storage.add_agent(username, hash_password("password123"), capacity=capacity,
                                       display_name=username.title())
    finally:
        await storage.close()


async def agent_on(node: Node, username: str) -> tuple[Client, dict[str, Any]]:
    return await node.agent(username)


def metric_sum(text: str, name: str) -> float:
    """A metric summed over its samples (every worker, every label)."""
    return sum(value for got, _, value in samples(text) if got == name)


# -- the whole conversation, across nodes ----------------------------------------------------

async def whole_conversation(visitor_node: Server, agent_node: Server, other_visitor_node: Server,
                             agent: Client, username: str) -> None:
    """Handoff, typing, read receipts, messages both ways, a resume on another node, close."""
    visitor, vw = await visitor_node.visitor()
    cid = vw["conversation"]["id"]
    await visitor.expect("message")                                  # greeting
    await visitor.message("talk to a human")                         # the test bot's handoff rule
    assigned_ev = await visitor.expect(is_event("assigned"))
    assert assigned_ev["meta"]["agent"]["name"] == username.title()
    assigned = await agent.expect(lambda f: f.get("type") == "assigned" and f["conversation"]["id"] == cid)
    assert assigned["conversation"]["state"] == "human"
    transcript = [await agent.expect(lambda f: f.get("type") == "message" and f["conversation"] == cid)
                  for _ in range(4)]                                 # greeting, ask, handoff reply, assigned
    assert [m["seq"] for m in transcript] == [1, 2, 3, 4]

    ack = await agent.message("Hello from the other node", conversation=cid)
    assert ack["type"] == "ack" and ack["seq"] == 5
    got = await visitor.expect(is_message("agent"))
    assert got["text"] == "Hello from the other node" and got["seq"] == 5
    await visitor.message("my parcel is late")
    got = await agent.expect(is_message("visitor", "my parcel is late"))
    assert got["seq"] == 6
    await visitor.send({"type": "typing", "on": True})
    t = await agent.expect("typing")
    assert t["role"] == "visitor" and t["on"] is True and t["conversation"] == cid
    await agent.send({"type": "typing", "conversation": cid, "on": True})
    t = await visitor.expect("typing")
    assert t["role"] == "agent" and t["on"] is True
    await agent.send({"type": "read", "conversation": cid, "seq": 6})
    r = await visitor.expect("read")
    assert r["role"] == "agent" and r["seq"] == 6

    # the visitor drops; the agent goes on; the visitor comes back on the third node
    await visitor.close()
    for i in range(3):
        assert (await agent.message(f"while you were away {i}", conversation=cid))["seq"] == 7 + i
    again, welcome = await other_visitor_node.visitor(token=vw["token"], conversation=cid, last_seq=6)
    assert welcome["conversation"]["id"] == cid
    missed = [await again.expect("message") for _ in range(3)]
    assert [(m["seq"], m["text"]) for m in missed] == [(7 + i, f"while you were away {i}") for i in range(3)]
    await agent.message("welcome back", conversation=cid)
    live = await again.expect("message")
    assert (live["seq"], live["text"]) == (10, "welcome back")        # no gap, no duplicate
    await again.message("thanks")
    assert (await agent.expect(is_message("visitor", "thanks")))["seq"] == 11

    await agent.send({"type": "close", "conversation": cid})
    await again.expect(is_event("closed"))
    un = await agent.expect(lambda f: f.get("type") == "unassigned" and f["conversation"] == cid)
    assert un["reason"] == "closed"
    await again.close()


@pytest.mark.parametrize("database", ["postgresql", "mysql"], indirect=True)
async def test_a_whole_conversation_with_visitor_and_agent_on_different_nodes(cluster, database):
    """Rule: two nodes sharing Redis and the database serve one conversation together (fan-out,
    routing, typing, read receipts, close), and a visitor resumes on another node with no gap."""
    a = await cluster("node-a", database)
    b = await cluster("node-b", database)
    await add_agent(database, "alice", capacity=2)
    agent, welcome = await agent_on(b, "alice")
    assert welcome["node"].startswith("node-b/")
    await whole_conversation(a, b, b, agent, "alice")
    # and the other way round, the visitor coming back on the node it started on
    await whole_conversation(b, b, a, agent, "alice")
    await whole_conversation(a, b, a, agent, "alice")

    # /metrics on either node shows every worker of both, labelled: summed over the workers,
    # the messages stored are what the database holds
    storage = await open_storage(database)
    try:
        in_db = sum(c.last_seq for c in await storage.list_conversations(limit=100))
    finally:
        await storage.close()
    for node in (a, b):
        for _ in range(100):        # each worker's snapshot is at most metrics_push_s (0.5 s) old
            text = await node.metrics()
            if metric_sum(text, "kefu_messages_stored_total") == in_db:
                break
            await asyncio.sleep(0.05)
        assert metric_sum(text, "kefu_messages_stored_total") == in_db
        workers = {w for w in re.findall(r'kefu_connections_opened_total\{[^}]*worker="([^"]+)"', text)}
        assert {w.split("/")[0] for w in workers} == {"node-a", "node-b"}


async def test_two_workers_on_one_machine_serve_a_conversation_across_workers(cluster, tmp_path):
    """Rule: ``--workers 2`` (Sanic's multi-worker mode, SQLite shared on one machine, Redis)
    serves a conversation whose visitor and agent sockets are on different workers."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'shared.sqlite3'}"
    node = await cluster("node-w", database, workers=2)
    await add_agent(database, "walt", capacity=3)
    agent, aw = await agent_on(node, "walt")
    here = aw["node"]
    assert here in ("node-w/0", "node-w/1")
    there = "node-w/1" if here == "node-w/0" else "node-w/0"

    class OnWorker:
        """Opens visitor sockets until one lands on the wanted worker (the kernel picks)."""

        def __init__(self, worker: str) -> None:
            self.worker = worker

        async def visitor(self, **hello: Any) -> tuple[Client, dict[str, Any]]:
            for _ in range(60):
                client, welcome = await node.visitor(**hello)
                if welcome["node"] == self.worker:
                    return client, welcome
                await client.close()
            raise AssertionError(f"no socket landed on {self.worker}")

    await whole_conversation(OnWorker(there), node, OnWorker(there), agent, "walt")   # type: ignore[arg-type]
    await whole_conversation(OnWorker(there), node, OnWorker(here), agent, "walt")    # type: ignore[arg-type]


def is_outcome(f: dict[str, Any]) -> bool:
    return is_event("assigned")(f) or is_event("queued")(f) or is_event("unavailable")(f)


async def test_sixty_handoffs_at_once_over_two_nodes_never_overfill_an_agent_nor_assign_twice(cluster, database):
    """Rule: with 3 agents of capacity 5 on two nodes, 60 simultaneous handoffs (half on each
    node) assign exactly 15 conversations, at most 5 per agent and none twice; the other 45
    queue in order (positions 1..45) and are offered head first as agents free up."""
    a = await cluster("node-a", database)
    b = await cluster("node-b", database)
    for name in ("ann", "ben", "cat"):
        await add_agent(database, name, capacity=5)
    agents = {"Ann": (await a.agent("ann"))[0], "Ben": (await b.agent("ben"))[0], "Cat": (await a.agent("cat"))[0]}
    visitors: dict[str, Client] = {}
    for i in range(60):
        v, vw = await (a if i % 2 == 0 else b).visitor()
        visitors[vw["conversation"]["id"]] = v
    await asyncio.gather(*(v.send({"type": "handoff"}) for v in visitors.values()))
    outcomes = dict(zip(visitors, await asyncio.gather(*(v.expect(is_outcome, timeout=30)
                                                         for v in visitors.values()))))
    assigned = {cid: ev["meta"]["agent"]["name"] for cid, ev in outcomes.items() if ev["meta"]["event"] == "assigned"}
    queued = {cid: ev["meta"]["position"] for cid, ev in outcomes.items() if ev["meta"]["event"] == "queued"}
    assert len(assigned) == 15 and len(queued) == 45, {e["meta"]["event"] for e in outcomes.values()}
    assert sorted(assigned.values()) == ["Ann"] * 5 + ["Ben"] * 5 + ["Cat"] * 5
    assert sorted(queued.values()) == list(range(1, 46))
    # each agent's own sockets were told of exactly its five, on whichever node they are
    for name, client in agents.items():
        got = [await client.expect("assigned", timeout=10) for _ in range(5)]
        assert sorted(g["conversation"]["id"] for g in got) == sorted(c for c, n in assigned.items() if n == name)
    token = await a.login("ann")
    status, listing = await b.http("GET", "/api/v1/agents", token=token)
    assert status == 200
    assert listing["queue"] == sorted(queued, key=queued.get)                 # arrival order
    assert {x["username"]: x["load"] for x in listing["agents"]} == {"ann": 5, "ben": 5, "cat": 5}

    # agents free up, on both nodes: each time the head of the queue is offered to that agent
    order = sorted(queued, key=queued.get)
    for step, name in enumerate(["Ben", "Ann", "Ben", "Cat", "Ann", "Ben"]):
        mine = next(c for c, n in assigned.items() if n == name)
        del assigned[mine]
        await agents[name].send({"type": "close", "conversation": mine})
        head = order[step]
        ev = await visitors[head].expect(is_event("assigned"), timeout=10)
        assert ev["meta"]["agent"]["name"] == name
        offered = await agents[name].expect(lambda f: f.get("type") == "assigned", timeout=10)
        assert offered["conversation"]["id"] == head
        assigned[head] = name
    status, listing = await a.http("GET", "/api/v1/agents", token=token)
    assert listing["queue"] == order[6:]
    assert max(x["load"] for x in listing["agents"]) == 5
    for v in visitors.values():
        await v.close()


async def test_redis_restarted_mid_traffic_loses_no_acked_message_and_delivery_resumes(private_redis, cluster,
                                                                                      database):
    """Rule: Redis killed and restarted (empty) while a visitor on one node and an agent on
    the other keep talking: every acked message reaches the other side exactly once and in
    seq order, each node's subscription is back by itself within 5 s, the outage is counted
    (/healthz, /metrics), and routing works again afterwards."""
    redis = private_redis
    if True:       # (the nodes stop before the private Redis: fixtures tear down in reverse)
        a = await cluster("node-a", database, redis.url)
        b = await cluster("node-b", database, redis.url)
        await add_agent(database, "rita", capacity=5)
        agent, _ = await b.agent("rita")
        visitor, vw = await a.visitor()
        cid = vw["conversation"]["id"]
        await visitor.message("talk to a human")
        await agent.expect(lambda f: f.get("type") == "assigned" and f["conversation"]["id"] == cid)

        acked = {"visitor": {}, "agent": {}}          # seq -> text, as acked to the sender
        seen = {"visitor": [], "agent": []}           # (seq, text) received by the other side
        done = asyncio.Event()

        async def read(client: Client, role: str, into: list) -> None:
            while not done.is_set():
                try:
                    f = await client.recv(0.5)
                except asyncio.TimeoutError:
                    continue
                if (f.get("type") == "message" and f.get("role") == role and f.get("kind") == "text"
                        and f["text"].startswith(role + " ")):     # (not the transcript before)
                    into.append((f["seq"], f["text"]))

        readers = [asyncio.create_task(read(agent, "visitor", seen["visitor"])),
                   asyncio.create_task(read(visitor, "agent", seen["agent"]))]

        async def send(role: str, i: int) -> None:
            client = visitor if role == "visitor" else agent
            cid_arg = None if role == "visitor" else cid
            text = f"{role} {i}"
            frame_id = uuid.uuid4().hex
            frame = {"type": "message", "id": frame_id, "text": text, **({"conversation": cid_arg} if cid_arg else {})}
            await client.send(frame)
            # the reader task takes every frame: wait for the ack in its list of frames
            for _ in range(400):
                ack = next((f for f in client.frames if f.get("id") == frame_id), None)
                if ack is not None:
                    assert ack["type"] == "ack", ack
                    acked[role][ack["seq"]] = text
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"no ack for {text}")

        down_at = None
        for i in range(120):
            await send("visitor" if i % 2 == 0 else "agent", i)
            if i == 40:
                redis.kill()
                down_at = asyncio.get_running_loop().time()
            if 40 <= i < 80:
                await asyncio.sleep(0.02)         # about a second of traffic with Redis away
            if i == 80:
                await redis.start()
                back_at = asyncio.get_running_loop().time()
        assert down_at is not None
        # both subscriptions back by themselves, within 5 s of Redis answering again
        for node in (a, b):
            for _ in range(500):
                health = await node.health()
                if health["broker"]["connected"]:
                    break
                await asyncio.sleep(0.01)
            assert health["broker"]["connected"] and health["status"] == "ok"
            assert health["broker"]["outages"] >= 1
        assert asyncio.get_running_loop().time() - back_at <= 5.0
        # every acked message arrives on the other side, once, in order (repaired by seq)
        for _ in range(1000):
            if len(seen["visitor"]) >= len(acked["visitor"]) and len(seen["agent"]) >= len(acked["agent"]):
                break
            await asyncio.sleep(0.01)
        done.set()
        await asyncio.gather(*readers)
        for role in ("visitor", "agent"):
            assert seen[role] == sorted(acked[role].items()), role
        assert len(acked["visitor"]) == 60 and len(acked["agent"]) == 60
        texts = [await node.metrics() for node in (a, b)]
        assert all(metric_sum(t, "kefu_broker_outages_total") >= 1 for t in texts)
        assert sum(metric_sum(t, "kefu_feed_repairs_total") for t in texts) >= 1     # caught up by seq

        # routing works again on the emptied Redis: a new handoff reaches rita on the other node
        v2, vw2 = await a.visitor()
        await v2.message("talk to a human")
        ev = await v2.expect(is_event("assigned"), timeout=10)
        assert ev["meta"]["agent"]["name"] == "Rita"
        await agent.expect(lambda f: f.get("type") == "assigned" and f["conversation"]["id"] == vw2["conversation"]["id"])


async def test_a_node_killed_hands_its_agents_conversations_to_the_other_node_and_its_visitors_resume_there(
        cluster, database):
    """Rule: a node killed with SIGKILL stops refreshing its presence; after the presence TTL
    and the grace period its agents' conversations go back to the queue and are offered to an
    agent on the other node, and its visitors resume on the other node with no gap."""
    a = await cluster("node-a", database, presence_ttl_s=1.5, grace_s=1.0)
    b = await cluster("node-b", database, presence_ttl_s=1.5, grace_s=1.0)
    await add_agent(database, "kim", capacity=3)
    await add_agent(database, "lee", capacity=3)
    kim, _ = await a.agent("kim")
    v1, vw1 = await a.visitor()          # a visitor on the node that dies
    v2, vw2 = await b.visitor()          # and one on the node that lives, both with kim
    cids = {vw1["conversation"]["id"], vw2["conversation"]["id"]}
    for v in (v1, v2):
        await v.message("talk to a human")
        assert (await v.expect(is_event("assigned")))["meta"]["agent"]["name"] == "Kim"
    await kim.message("hello from kim", conversation=vw1["conversation"]["id"])
    last = (await v1.expect(is_message("agent", "hello from kim")))["seq"]
    lee, _ = await b.agent("lee")

    a.kill()
    offered = {(await lee.expect("assigned", timeout=20))["conversation"]["id"] for _ in range(2)}
    assert offered == cids
    ev = await v2.expect(is_event("assigned"), timeout=10)        # live, on the node that lives
    assert ev["meta"]["agent"]["name"] == "Lee"

    again, welcome = await b.visitor(token=vw1["token"], conversation=vw1["conversation"]["id"], last_seq=last)
    assert welcome["node"].startswith("node-b/") and welcome["conversation"]["agent"] is not None
    missed = []
    while not missed or not is_event("assigned")(missed[-1]):
        missed.append(await again.expect("message", timeout=10))
    assert [m["seq"] for m in missed] == list(range(last + 1, last + 1 + len(missed)))   # no gap
    assert missed[-1]["meta"]["agent"]["name"] == "Lee"
    await lee.message("Lee here", conversation=vw1["conversation"]["id"])
    assert (await again.expect(is_message("agent", "Lee here")))["seq"] == missed[-1]["seq"] + 1


@pytest.mark.parametrize("env,says", [
    ({}, "server.workers = 2 needs server.redis_url (KEFU_SERVER_REDIS_URL)"),
    ({"KEFU_SERVER_REDIS_URL": "redis://127.0.0.1:1/0"}, "server.redis_url: no Redis answers at redis://127.0.0.1:1/0"),
])
def test_serve_with_workers_but_no_usable_redis_is_one_clear_error(tmp_path, env, says):
    """Rule: ``kefu serve --workers 2`` without Redis, or with a Redis that does not answer,
    stops at once with exit status 2 and an error naming the setting (not a traceback per worker)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KEFU_")}
    out = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--workers", "2", "--port", str(free_port()),
                          "--data-dir", str(tmp_path)], cwd=ROOT, env={**clean, "PYTHONPATH": str(ROOT), **env},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert says in out.stderr and "Traceback" not in out.stderr
