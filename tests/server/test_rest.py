"""REST API, /healthz, /metrics, OpenAPI, config and CLI."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine import ConfigError
from server.app import create_app
from server.routing import parse_business_hours
from server.config import load_server_config, secret_key

from .conftest import metric

ROOT = Path(__file__).resolve().parents[2]


async def test_stateless_bot_reply_has_kefu_ask_json_fields(server):
    status, data = await server.http("POST", "/api/v1/bots/testbot/reply", json_body={"text": "when are you open"})
    assert status == 200
    assert set(data) == {"bot", "session", "intent", "confidence", "answer", "handoff", "handoff_reason", "source",
                         "delay_ms", "suggestions"}
    assert data["answer"] == "We are open 9 to 5." and data["session"].startswith("once-")
    _, again = await server.http("POST", "/api/v1/bots/testbot/reply", json_body={"text": "when are you open"})
    assert again["session"] != data["session"]  # calls without a session share no memory
    status, data = await server.http("POST", "/api/v1/bots/testbot/reply", json_body={"text": "talk to a human", "session": "s1"})
    assert data["handoff"] is True and data["session"] == "s1"
    status, data = await server.http("POST", "/api/v1/bots/nope/reply", json_body={"text": "hi"})
    assert status == 404 and data["error"]["code"] == "unknown_bot"
    status, data = await server.http("POST", "/api/v1/bots/testbot/reply", json_body={"text": ""})
    assert status == 400 and data["error"]["code"] == "bad_input"
    status, data = await server.http("POST", "/api/v1/bots/testbot/reply", json_body=["x"])
    assert status == 400


async def test_healthz_metrics_openapi_bots(server):
    status, data = await server.http("GET", "/healthz")
    assert status == 200 and data["status"] == "ok" and data["bots"] == ["testbot"]
    client, _ = await server.visitor()
    await client.message("hi")
    await client.expect(lambda f: f.get("type") == "message" and f["seq"] == 3)
    status, text = await server.http("GET", "/metrics")
    assert status == 200
    for name, labels, value in (("kefu_connections", {}, 1), ("kefu_messages_stored_total", {"role": "visitor"}, 1),
                                ("kefu_bot_turns_total", {"outcome": "answered"}, 1),
                                ("kefu_ack_latency_seconds_count", {}, 1), ("kefu_queue_length", {}, 0),
                                ("kefu_connections_opened_total", {"kind": "visitor"}, 1)):
        assert metric(text, name, **labels) == value, (name, labels)
    status, doc = await server.http("GET", "/api/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.") and "/bots/{bot}/reply" in doc["paths"]
    status, data = await server.http("GET", "/api/v1/bots")
    assert data == {"bots": [{"name": "testbot", "greeting": "Hello from testbot."}]}


async def test_agents_and_knowledge_reload_need_an_agent(server):
    status, _ = await server.http("POST", "/api/v1/knowledge/reload", json_body={})
    assert status == 401
    await server.add_agent("kim", capacity=3)
    token = await server.login("kim")
    status, data = await server.http("POST", "/api/v1/knowledge/reload", token=token, json_body={"bot": "testbot"})
    assert status == 200 and data == {"reloaded": {"testbot": "ok"}}
    agent, _ = await server.agent("kim")
    status, data = await server.http("GET", "/api/v1/agents", token=token)
    assert status == 200
    (kim,) = data["agents"]
    assert kim["username"] == "kim" and kim["presence"] == "online" and kim["load"] == 0 and "password_hash" not in kim
    await agent.send({"type": "presence", "status": "away"})
    await agent.expect("presence")
    status, data = await server.http("GET", "/api/v1/agents/me", token=token)
    assert data["presence"] == "away"


async def test_visitor_session_token_then_socket(server):
    status, data = await server.http("POST", "/api/v1/visitor/session", json_body={})
    assert status == 200 and data["verified"] is False
    client, welcome = await server.visitor(token=data["token"])
    assert welcome["visitor"] == data["visitor"]


async def test_static_pages_have_a_csp(server):
    import asyncio
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    raw = (await reader.read()).lower()
    writer.close()
    if raw.startswith(b"http/1.1 404"):
        pytest.skip("no static pages")
    head = raw.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"http/1.1 200") and b"content-security-policy: default-src 'self'" in head
    assert b"object-src 'none'" in head and b"x-content-type-options: nosniff" in head


def test_config_defaults_env_overrides_and_errors(tmp_path):
    config = load_server_config(env={"KEFU_SERVER_PORT": "9001", "KEFU_SERVER_ORIGINS": "https://a.example,https://b.example",
                                     "KEFU_SERVER_RATE_PER_S": "2.5"})
    s = config["server"]
    assert s["port"] == 9001 and s["origins"] == ["https://a.example", "https://b.example"] and s["rate_per_s"] == 2.5
    assert s["max_frame_bytes"] == 65536
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nprot = 1\n")
    with pytest.raises(ConfigError):
        load_server_config(bad, env={})
    example = load_server_config(ROOT / "config.example.toml", env={})
    assert example["server"]["port"] == 8000


def test_secret_key_generated_once_into_data_dir(tmp_path):
    settings = {"secret_key": "", "data_dir": str(tmp_path / "d")}
    key = secret_key(settings)
    path = tmp_path / "d" / "secret.key"
    assert len(key) == 64 and path.read_bytes() == key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert secret_key(settings) == key
    with pytest.raises(ConfigError):
        secret_key({"secret_key": "short", "data_dir": str(tmp_path)})


def test_business_hours_parsing():
    assert parse_business_hours("", "UTC") is None
    hours = parse_business_hours("mon-fri 09:00-18:00; sat 10:00-14:00", "Europe/London")
    assert hours["timezone"] == "Europe/London" and hours["hours"]["wed"] == ["09:00-18:00"] and "sun" not in hours["hours"]
    assert parse_business_hours({"mon": "09:00-17:00"}, "UTC")["hours"] == {"mon": "09:00-17:00"}
    with pytest.raises(ConfigError):
        parse_business_hours("someday 9-5", "UTC")


async def test_outside_business_hours_visitor_may_leave_a_message(server_factory):
    # open one minute a week, at 00:00 on a day that is not today
    import datetime
    other = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[(datetime.datetime.utcnow().weekday() + 3) % 7]
    server = await server_factory(business_hours=f"{other} 00:00-00:01")
    await server.add_agent("night")
    await server.agent("night")
    visitor, _ = await server.visitor()
    await visitor.send({"type": "handoff"})
    ev = await visitor.expect(lambda f: f.get("type") == "message" and f.get("kind") == "event")
    assert ev["meta"]["event"] == "unavailable" and ev["meta"]["reason"] == "outside_business_hours"
    assert (await visitor.message("call me tomorrow"))["type"] == "ack"


def test_create_app_does_nothing_at_import_or_build(tmp_path):
    config = load_server_config(env={})
    config["server"]["data_dir"] = str(tmp_path / "never")
    create_app(config, name="kefu_build_only")
    assert not (tmp_path / "never").exists()      # storage and secrets open in before_server_start


def test_cli_agent_add_and_serve_help(tmp_path):
    env = {**os.environ, "KEFU_SERVER_DATA_DIR": str(tmp_path / "data")}
    kefu = [sys.executable, "-c", "import sys; from engine.cli import main; sys.exit(main())"]
    out = subprocess.run(kefu + ["agent", "add", "zoe", "--password-stdin", "--capacity", "4", "--display-name", "Zoe"],
                         input="s3cret-pass\n", capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "agent zoe created" in out.stdout and "capacity 4" in out.stdout
    again = subprocess.run(kefu + ["agent", "add", "zoe", "--password-stdin"], input="s3cret-pass\n",
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert again.returncode == 1 and "taken" in again.stderr
    short = subprocess.run(kefu + ["agent", "add", "amy", "--password-stdin"], input="short\n",
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert short.returncode != 0
    helptext = subprocess.run(kefu + ["serve", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "--data-dir" in helptext.stdout and "--port" in helptext.stdout


async def test_retention_deletes_conversations_closed_longer_ago_than_retention_days(server_factory):
    """Rule (privacy): with server.retention_days set, the purge deletes closed conversations
    closed longer ago than that, with their messages, and keeps newer and open ones; 0: off."""
    import asyncio as _asyncio

    from server.app import purge_expired
    from server.storage.base import CLOSED

    server = await server_factory(retention_days=1.0)
    storage = server.ctx.storage
    old = await storage.create_conversation("v" * 32, "testbot")
    await storage.append(old.id, role="visitor", sender_id="v" * 32, text="an old question")
    await storage.transition(old.id, to_state=CLOSED, agent_id=None)
    _, welcome = await server.visitor()                             # an open conversation
    assert await purge_expired(server.ctx) == 0                    # closed less than a day ago
    server.ctx.settings = server.ctx.settings.replace(retention_days=0.0)
    assert await purge_expired(server.ctx) == 0                    # off
    await _asyncio.sleep(0.01)                                     # (the closing is now 10 ms old)
    server.ctx.settings = server.ctx.settings.replace(retention_days=0.005 / 86400)
    assert await purge_expired(server.ctx) == 1
    assert await storage.get_conversation(old.id) is None
    assert await storage.messages(old.id, after_seq=0, limit=5) == []
    assert await storage.get_conversation(welcome["conversation"]["id"]) is not None
    assert server.ctx.metrics.value("kefu_retention_deleted_total") == 1


def test_a_visitors_data_is_exported_then_erased_from_the_command_line(tmp_path):
    """Rule (privacy): `kefu visitor export` prints every conversation and message of one
    visitor as JSON; `kefu visitor erase` deletes their closed conversations (open ones are kept
    and counted), and both are audited in the log."""
    import asyncio as _asyncio

    from server.storage import open_storage
    from server.storage.base import CLOSED

    data = tmp_path / "data"
    data.mkdir()

    async def seed() -> tuple[str, str]:
        storage = await open_storage(f"sqlite+aiosqlite:///{data / 'kefu.sqlite3'}")
        try:
            closed = await storage.create_conversation("v" * 32, "shop")
            await storage.append(closed.id, role="visitor", sender_id="v" * 32, text="my address is 1 Main St")
            await storage.transition(closed.id, to_state=CLOSED, agent_id=None)
            still_open = await storage.create_conversation("v" * 32, "shop")
            await storage.create_conversation("w" * 32, "shop")
            return closed.id, still_open.id
        finally:
            await storage.close()

    closed_id, open_id = _asyncio.run(seed())
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEFU_")}

    def kefu(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "engine.cli", *args, "--data-dir", str(data)], cwd=ROOT,
                              env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)

    out = kefu("visitor", "export", "v" * 32)
    assert out.returncode == 0, out.stderr
    exported = json.loads(out.stdout)
    assert {c["id"] for c in exported["conversations"]} == {closed_id, open_id}
    texts = [m["text"] for c in exported["conversations"] for m in c["messages"]]
    assert texts == ["my address is 1 Main St"]
    assert "audit: visitor export" in out.stderr
    out = kefu("visitor", "erase", "v" * 32)
    assert out.returncode == 0, out.stderr
    assert "1 closed conversation(s) deleted" in out.stdout and "1 open conversation(s) kept" in out.stdout
    assert "audit: visitor erase" in out.stderr
    left = json.loads(kefu("visitor", "export", "v" * 32).stdout)
    assert [c["id"] for c in left["conversations"]] == [open_id]
