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
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from server.auth import hash_password
from server.storage import open_storage

from .conftest import Client, Server, free_socket, http_request
from .storage_support import MY_HOST, MY_PORT, MY_USER, PG_HOST, PG_PORT, _pg_connect, my_admin, unavailable, \
    unique_name

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
        try:
            conn, user = await _pg_connect("postgres")
        except Exception as exc:  # noqa: BLE001
            unavailable(f"PostgreSQL at {PG_HOST}:{PG_PORT}", exc)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        yield f"postgresql+asyncpg://{user}@{PG_HOST}:{PG_PORT}/{name}"
        conn, _ = await _pg_connect("postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
    else:
        try:
            conn = await my_admin()
        except Exception as exc:  # noqa: BLE001
            unavailable(f"MariaDB/MySQL at {MY_HOST}:{MY_PORT}", exc)
        try:
            async with conn.cursor() as cur:
                await cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        finally:
            conn.close()
        yield f"mysql+asyncmy://{MY_USER}@{MY_HOST}:{MY_PORT}/{name}"
        conn = await my_admin()
        try:
            async with conn.cursor() as cur:
                await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            conn.close()


def free_port() -> int:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    return port


class PrivateRedis:
    """A redis-server of one test's own, so the test may kill and restart it."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(self.tmp)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis.asyncio as aioredis
        r = aioredis.Redis(port=self.port)
        try:
            for _ in range(200):
                try:
                    if await r.ping():
                        return
                except Exception:  # noqa: BLE001 -- still starting
                    await asyncio.sleep(0.02)
            raise AssertionError("private redis-server did not start")
        finally:
            await r.aclose()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


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


async def add_agent(database_url: str, username: str, capacity: int) -> Any:
    storage = await open_storage(database_url)
    try:
        return await storage.add_agent(username, hash_password("password123"), capacity=capacity,
                                       display_name=username.title())
    finally:
        await storage.close()


async def agent_on(node: Node, username: str) -> tuple[Client, dict[str, Any]]:
    return await node.agent(username)


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
