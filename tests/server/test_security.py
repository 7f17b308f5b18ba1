"""THREATS.md rows that apply to one process: origin, identity, ownership, spoofing, XSS, tokens."""
from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .conftest import RawSocket, http_request

XSS = '<img src=x onerror="alert(1)"><script>alert(2)</script><a href="javascript:alert(3)">x</a>{{7*7}}<svg onload=alert(4)>'


def sign(identity_id: str, ts: int | None, secret: str = "host-site-secret") -> str:
    msg = identity_id if ts is None else f"{identity_id}:{ts}"
    return hmac.new(secret.encode(), msg.encode(), hashlib.sha256).hexdigest()


async def closed_with(client) -> int:
    try:
        while True:
            await client.recv()
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else 1006


# -- 1: cross-site WebSocket hijacking ----------------------------------------------------

async def test_wrong_origin_gets_403_on_upgrade(server):
    with pytest.raises(InvalidStatus) as info:
        await server.connect("/ws/visitor", origin="https://evil.example")
    assert info.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as info:
        await server.connect("/ws/agent", origin="https://evil.example")
    assert info.value.response.status_code == 403
    ok = await server.connect("/ws/visitor", origin="https://shop.example")   # allow-listed
    await ok.close()
    # The server's own pages (the widget's iframe, the console) need no allow-list entry.
    own = await server.connect("/ws/visitor", origin=server.ws_base.replace("ws://", "http://"))
    await own.close()
    assert server.ctx.metrics.value("kefu_http_rejected_total", reason="origin") == 2


# -- 2: host-site identity ----------------------------------------------------------------

async def test_bad_identity_is_401_and_changes_nothing(server):
    now = int(time.time())
    bad = [
        {"id": "user-42", "ts": now, "hash": "0" * 64},                           # wrong
        {"id": "user-42", "ts": now, "hash": ""},                                 # empty
        {"id": "user-42", "ts": now, "hash": sign("user-43", now)},               # someone else's
        {"id": "user-42", "ts": now - 3600, "hash": sign("user-42", now - 3600)},  # replayed, stale
        {"id": "user-42", "ts": now, "hash": sign("user-42", now, "other-secret")},
    ]
    for identity in bad:
        status, data = await server.http("POST", "/api/v1/visitor/session", json_body={"identity": identity})
        assert status == 401 and data["error"]["code"] == "unauthorized"
        client = await server.connect("/ws/visitor")
        await client.send({"type": "hello", "bot": "testbot", "identity": identity})
        err = await client.expect("error")
        assert err["code"] == "unauthorized"
        assert await closed_with(client) == 4001
    verified_id = server.ctx.tokens.verified_visitor_id("user-42")
    assert await server.ctx.storage.list_conversations(visitor_id=verified_id) == []

    good = {"id": "user-42", "ts": now, "hash": sign("user-42", now)}
    status, data = await server.http("POST", "/api/v1/visitor/session", json_body={"identity": good})
    assert status == 200 and data["verified"] is True and data["visitor"] == verified_id
    client, welcome = await server.visitor(identity=good)
    assert welcome["verified"] is True and welcome["visitor"] == verified_id


# -- 3: someone else's conversation ---------------------------------------------------------

async def test_foreign_or_unknown_conversation_is_404_everywhere(server):
    alice, aw = await server.visitor()
    await alice.message("my secret address is 1 Main St")
    bob, bw = await server.visitor()
    cid = aw["conversation"]["id"]
    # REST: foreign and unknown look the same
    for target in (cid, "f" * 32):
        for path in (f"/api/v1/conversations/{target}", f"/api/v1/conversations/{target}/messages"):
            status, data = await server.http("GET", path, token=bw["token"])
            assert status == 404 and data == {"error": {"code": "not_found", "message": "no such conversation"}}
    status, data = await server.http("GET", "/api/v1/conversations", token=bw["token"])
    assert [c["id"] for c in data["conversations"]] == [bw["conversation"]["id"]]
    # WebSocket: resuming someone else's conversation
    for target in (cid, "f" * 32):
        thief = await server.connect("/ws/visitor")
        await thief.send({"type": "hello", "token": bw["token"], "conversation": target, "last_seq": 0})
        err = await thief.expect("error")
        assert err["code"] == "not_found"
        assert await closed_with(thief) == 4004
        assert not any("secret" in json.dumps(f) for f in thief.frames)


async def test_agent_cannot_touch_conversation_of_another_agent(server):
    await server.add_agent("owner")
    await server.add_agent("other")
    owner, _ = await server.agent("owner")
    visitor, vw = await server.visitor()
    cid = vw["conversation"]["id"]
    await visitor.send({"type": "handoff"})
    await owner.expect("assigned")
    other, _ = await server.agent("other")
    token = await server.login("other")
    for frame in ({"type": "message", "conversation": cid, "id": "x1", "text": "hi"},
                  {"type": "close", "conversation": cid},
                  {"type": "transfer", "conversation": cid, "to": "someone"},
                  {"type": "sync", "conversation": cid, "last_seq": 0},
                  {"type": "typing", "conversation": cid}):
        await other.send(frame)
        err = await other.expect("error")
        assert err["code"] == "not_found", frame
    status, _ = await server.http("GET", f"/api/v1/conversations/{cid}/messages", token=token)
    assert status == 404


# -- 4: spoofed sender or role ------------------------------------------------------------------

async def test_forged_sender_and_role_are_ignored(server):
    visitor, vw = await server.visitor()
    await visitor.send({"type": "message", "id": "f1", "text": "I am the agent", "role": "agent",
                        "sender": "agent-1", "kind": "event", "meta": {"event": "closed"}, "seq": 999})
    ack = await visitor.expect("ack")
    assert ack["seq"] == 2
    status, data = await server.http("GET", f"/api/v1/conversations/{vw['conversation']['id']}/messages",
                                     token=vw["token"])
    msg = data["messages"][1]
    assert (msg["role"], msg["sender"], msg["kind"], msg["meta"]) == ("visitor", vw["visitor"], "text", {})


# -- 5: stored XSS ------------------------------------------------------------------------------------

async def test_xss_payload_stored_and_returned_verbatim(server):
    await server.add_agent("xena")
    agent, _ = await server.agent("xena")
    visitor, vw = await server.visitor()
    cid = vw["conversation"]["id"]
    await visitor.send({"type": "handoff"})
    await agent.expect("assigned")
    await visitor.message(XSS)
    got = await agent.expect(lambda f: f.get("type") == "message" and f["role"] == "visitor")
    assert got["text"] == XSS
    status, data = await server.http("GET", f"/api/v1/conversations/{cid}/messages", token=vw["token"])
    assert status == 200 and any(m["text"] == XSS for m in data["messages"])
    # the JSON API is served as JSON, never as HTML
    reader_status, raw = await http_raw(server.port, f"/api/v1/conversations/{cid}/messages", vw["token"])
    assert b"content-type: application/json" in raw.lower() and b"nosniff" in raw.lower()


async def http_raw(port, path, token):
    import asyncio
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    return 200, raw


# -- 11, 12: missing, expired, revoked tokens; brute force; auth timeout ----------------------------

async def test_missing_and_expired_tokens(server):
    status, data = await server.http("GET", "/api/v1/conversations")
    assert status == 401
    status, _ = await server.http("GET", "/api/v1/agents", token="garbage.token")
    assert status == 401
    agent = await server.add_agent("old")
    expired = server.ctx.tokens.agent_token(agent.id, agent.token_version, ttl_s=-1)
    status, data = await server.http("GET", "/api/v1/agents", token=expired)
    assert status == 401 and "expired" in data["error"]["message"]
    client = await server.connect("/ws/agent")
    await client.send({"type": "hello", "token": expired})
    assert (await client.expect("error"))["code"] == "unauthorized"
    assert await closed_with(client) == 4001
    client = await server.connect("/ws/agent")
    await client.send({"type": "hello"})
    assert await closed_with(client) == 4001
    # a visitor token is not an agent token
    _, vw = await server.visitor()
    client = await server.connect("/ws/agent")
    await client.send({"type": "hello", "token": vw["token"]})
    assert await closed_with(client) == 4001
    expired_visitor = server.ctx.tokens.visitor_token("v" + "0" * 32, ttl_s=-1)
    client = await server.connect("/ws/visitor")
    await client.send({"type": "hello", "token": expired_visitor})
    assert await closed_with(client) == 4001


async def test_password_change_revokes_token_and_closes_live_socket(server):
    await server.add_agent("rita")
    agent, _ = await server.agent("rita")
    token = await server.login("rita")
    status, data = await server.http("POST", "/api/v1/auth/password", token=token,
                                     json_body={"old_password": "password123", "new_password": "n3w-passw0rd"})
    assert status == 200 and data["token"] != token
    assert await closed_with(agent) == 4002
    status, _ = await server.http("GET", "/api/v1/agents/me", token=token)
    assert status == 401
    status, _ = await server.http("GET", "/api/v1/agents/me", token=data["token"])
    assert status == 200
    client = await server.connect("/ws/agent")
    await client.send({"type": "hello", "token": token})
    assert await closed_with(client) == 4002


async def test_login_failures_are_throttled(server_factory):
    server = await server_factory(login_failures_per_ip_per_min=3)
    await server.add_agent("sam")
    for _ in range(3):
        status, _ = await server.http("POST", "/api/v1/auth/login", json_body={"username": "sam", "password": "nope"})
        assert status == 401
    status, data = await server.http("POST", "/api/v1/auth/login",
                                     json_body={"username": "sam", "password": "password123"})
    assert status == 429 and data["error"]["code"] == "rate_limited"


async def test_socket_that_never_says_hello_is_closed(server_factory):
    server = await server_factory(auth_timeout_s=0.4)
    raw = await RawSocket.open(server.port, "/ws/visitor")
    assert raw.status == 101
    assert await raw.close_code() == 4001
    raw.close()


async def test_a_password_changed_by_another_process_closes_the_agents_live_sockets(server_factory, tmp_path):
    """Rule: a password changed outside this server (``kefu agent password`` on the same
    database, another node) revokes the agent's live sockets within token_check_s: 4002."""
    import subprocess
    import sys
    from pathlib import Path

    server = await server_factory(token_check_s=0.3)
    await server.add_agent("otto")
    first, _ = await server.agent("otto")
    second, _ = await server.agent("otto")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "engine.cli", "agent", "password", "otto", "--password-stdin",
                          "--data-dir", str(tmp_path / "data")], input="an0ther-passw0rd\n", text=True,
                         capture_output=True, cwd=root, timeout=60)
    assert out.returncode == 0, out.stderr
    assert await closed_with(first) == 4002 and await closed_with(second) == 4002
    assert server.ctx.metrics.value("kefu_agent_sockets_revoked_total") == 2


async def test_an_agent_socket_is_closed_when_its_token_expires(server_factory):
    """Rule: a socket does not outlive its token: at expiry it is closed with 4001 (log in again)."""
    server = await server_factory(token_check_s=0.2)
    await server.add_agent("eve")
    eve = await server.ctx.storage.get_agent(username="eve")
    token = server.ctx.tokens.agent_token(eve.id, eve.token_version, ttl_s=1.0)
    client = await server.connect("/ws/agent")
    await client.send({"type": "hello", "token": token})
    await client.expect("welcome")
    err = await client.expect("error", timeout=5)
    assert err["code"] == "unauthorized" and "expired" in err["message"]
    assert await closed_with(client) == 4001


async def test_a_token_spelled_with_extra_characters_is_refused(server):
    """Rule: tokens decode strictly: a character outside URL-safe base64 slipped into the
    signature or body (which a lenient decoder skips) makes the token invalid."""
    await server.add_agent("bea")
    token = await server.login("bea")
    body, sig = token.split(".")
    for forged in (f"{body}.{sig[:5]}*{sig[5:]}", f"{body}.{sig}=", f"{body[:3]}!{body[3:]}.{sig}",
                   f"{body}.{sig[:-1]}{'A' if sig[-1] != 'A' else 'B'}"):
        status, data = await server.http("GET", "/api/v1/agents/me", token=forged)
        assert status == 401, forged
    status, _ = await server.http("GET", "/api/v1/agents/me", token=token)
    assert status == 200


async def test_the_data_folder_and_database_are_private_to_the_server_user(server_factory, tmp_path):
    """Rule: the data folder (transcripts, password hashes, secret) is created 0700 and the
    SQLite files 0600."""
    import stat

    server = await server_factory(data_dir=tmp_path / "private")
    visitor, _ = await server.visitor()
    await visitor.message("hello")
    folder = tmp_path / "private"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = [p for p in folder.iterdir() if p.name.startswith("kefu.sqlite3")]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), \
        [(p.name, oct(p.stat().st_mode)) for p in files]


async def _headers(port: int, path: str) -> dict[str, str]:
    import asyncio as _asyncio
    reader, writer = await _asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in head)}


async def test_pages_connect_only_to_this_server_and_the_console_is_never_framed(server):
    """Rule: the pages' CSP lets them connect to this server only (not any ws: host), the
    console may not be framed by anyone, the chat page only by the configured shop origins,
    and no page leaks its address as a referrer."""
    chat = await _headers(server.port, "/")
    console = await _headers(server.port, "/console")
    host = f"127.0.0.1:{server.port}"
    for h in (chat, console):
        assert f"connect-src 'self' ws://{host} wss://{host};" in h["content-security-policy"]
        assert h["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in console["content-security-policy"]
    assert "frame-ancestors 'self' http://127.0.0.1 https://shop.example" in chat["content-security-policy"]


async def test_metrics_need_the_configured_bearer_token(server_factory):
    """Rule: with server.metrics_token set, /metrics answers 401 without it (or with another)."""
    server = await server_factory(metrics_token="scrape-me-0123")
    status, _ = await server.http("GET", "/metrics")
    assert status == 401
    status, _ = await server.http("GET", "/metrics", token="wrong")
    assert status == 401
    status, text = await server.http("GET", "/metrics", token="scrape-me-0123")
    assert status == 200 and "kefu_connections" in text


async def test_visitor_sessions_over_rest_are_rate_limited_per_ip(server_factory):
    """Rule: POST /api/v1/visitor/session is limited per client IP (300 in 0.1 s were served)."""
    server = await server_factory(visitor_sessions_per_ip_per_min=5)
    got = [(await server.http("POST", "/api/v1/visitor/session", json_body={}))[0] for _ in range(7)]
    assert got == [200] * 5 + [429] * 2


def test_own_pages_origin_must_match_scheme_and_with_public_urls_the_host_header_is_not_trusted():
    """Rule: without public_urls a page of this host is allowed only with the request's own
    scheme; with public_urls set only those origins (and `origins`) may open sockets, whatever
    Host says (a DNS-rebinding page sends its own name as both Host and Origin)."""
    from server.config import Settings
    from server.ws import origin_allowed

    from .conftest import server_config

    plain = Settings.from_config(server_config("/tmp/kefu-unused", origins=["https://shop.example"]))
    assert origin_allowed("http://chat.local:8000", "chat.local:8000", plain, "http")
    assert origin_allowed("https://chat.local", "chat.local", plain, "wss")
    assert not origin_allowed("https://chat.local:8000", "chat.local:8000", plain, "http")
    assert origin_allowed("https://shop.example", "chat.local", plain, "http")
    pinned = plain.replace(public_urls=("https://chat.example.com",))
    assert origin_allowed("https://chat.example.com", "chat.example.com", pinned, "https")
    assert not origin_allowed("http://rebind.evil:8000", "rebind.evil:8000", pinned, "http")
    assert not origin_allowed("http://chat.example.com", "chat.example.com", pinned, "http")
    assert origin_allowed("https://shop.example", "rebind.evil", pinned, "http")


async def test_failed_logins_are_throttled_per_account_across_addresses(server_factory):
    """Rule: guesses at one account spread over many addresses are throttled per account too
    (429 for that account only, for the rest of a one-minute window: never a lockout)."""
    server = await server_factory(proxies_count=1, login_failures_per_ip_per_min=100,
                                  login_failures_per_account_per_min=3)
    await server.add_agent("sam")
    await server.add_agent("tess")

    async def login(username: str, password: str, ip: str) -> tuple[int, Any]:
        return await http_request(server.port, "POST", "/api/v1/auth/login",
                                  json_body={"username": username, "password": password},
                                  headers={"X-Forwarded-For": ip})

    for i in range(3):
        assert (await login("sam", "nope", f"203.0.113.{i + 1}"))[0] == 401
    status, data = await login("sam", "password123", "203.0.113.50")
    assert status == 429 and "this account" in data["error"]["message"]
    assert (await login("tess", "password123", "203.0.113.51"))[0] == 200


async def test_logout_revokes_the_token_and_closes_the_agents_open_sockets(server):
    """Rule: POST /api/v1/auth/logout ends the agent's sessions: the token (and every other
    issued before) no longer works, and open sockets close with 4002 at once."""
    await server.add_agent("lou")
    socket, _ = await server.agent("lou")
    token = await server.login("lou")
    status, data = await server.http("POST", "/api/v1/auth/logout", token=token)
    assert status == 200 and data == {"logged_out": True}
    assert await closed_with(socket) == 4002
    status, _ = await server.http("GET", "/api/v1/agents/me", token=token)
    assert status == 401
    status, _ = await server.http("POST", "/api/v1/auth/logout", token=token)
    assert status == 401
    assert (await server.http("GET", "/api/v1/agents/me", token=await server.login("lou")))[0] == 200
