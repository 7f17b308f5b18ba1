"""Hostile input on every REST route, parameter and static path ("Hardening", failure 5).

The rule: an input error answers 400/404 (401/403/413/429 where docs/protocol.md says so) with
``{"error": {"code", "message"}}``: never a 5xx, never a traceback.

The routes come from the app's router and their query and body parameters from
server/openapi.json, so a new route or parameter is fuzzed without editing this file (and a
route missing from the OpenAPI document fails ``test_every_api_route_is_in_openapi_so_it_is_fuzzed``).
A deterministic table of values (hypothesis is not installed here); the file runs in about 20 s.
"""
from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import _unchunk

ROOT = Path(__file__).resolve().parents[2]
OPENAPI = json.loads((ROOT / "server" / "openapi.json").read_text(encoding="utf-8"))
INT_MAX = 2 ** 63 - 1
IDENTITY_SECRET = "host-site-secret"     # conftest.server_config's identity_secret
TIMEOUT = 10.0

# -- the hostile values ------------------------------------------------------------------------

#: As they go into a URL (path segment or query value): raw, percent-escapes left to the server.
#: At most 4000 characters: a longer request head is refused by Sanic itself (413, see below).
URL_VALUES = [
    "0", "-1", "-0", "+1", "1.5", "1_000", "0x10", "%201", "%EF%BC%91", "%D9%A1",    # (fullwidth, Arabic-Indic 1)
    str(INT_MAX), str(2 ** 63), str(2 ** 64), str(-2 ** 63 - 1), "9" * 4000,
    "1e400", "-1e400", "1e-400", "nan", "NaN", "inf", "-Infinity",
    "", "%00", "a%00b", "%ff", "%c3%28", "%ed%a0%80", "%e4%b8%ad%f0%9f%98%80", "%e2%80%ae",
    "x" * 4000, "%25", "%", "%zz", "..%2f..%2fetc%2fpasswd", "%2e%2e", "[]", "{}", "%5B1%5D", "true", "null",
    "'%20OR%201=1--",
]


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


#: JSON body field values (``json.dumps`` writes NaN and Infinity as the bare words).
JSON_VALUES: list[Any] = [
    0, -1, INT_MAX, 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 400, 1.5, -0.0, 1e308, float("nan"), float("inf"),
    True, False, None, "", " ", "nan", "0", "x" * 100_000, "\x00", "a\x00b", "\ud800", "a\udfffb", "中文😀",
    "\u202eevil", "\r\n", "../../etc/passwd", [], {}, [1, 2], ["x"], {"a": {"b": [None]}}, _nested(200),
]

#: Whole request bodies that are not a JSON object.
RAW_BODIES = [
    b"", b" ", b"not json", b"\xff\xfe\xfd", b"\x00", b"[]", b"[1,2]", b'"text"', b"123", b"null", b"true", b"{",
    b'{"a":1}{"b":2}', b"NaN", b'{"text": NaN, "username": Infinity}', b"\xef\xbb\xbf{}", "{}".encode("utf-16"),
    b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"1" + b"0" * 5000,
    b'{"text": 1' + b"0" * 5000 + b"}", b'{"text": "\\ud800", "username": "\\u0000"}',
]

#: Authorization headers that are not a valid token.
BAD_AUTH = ["", "Bearer", "Bearer ", "Bearer x", "Bearer a.b", "Bearer ..", "Bearer " + "a" * 3000 + ".b",
            "Basic dXNlcjpwYXNz", "Bearer \xe9t\xe9.\xff", "bearer %00.%00"]


# -- a raw HTTP client: bytes in, bytes out ------------------------------------------------------

class Answer:
    def __init__(self, status: int, head: bytes, payload: bytes) -> None:
        self.status, self.head, self.payload = status, head, payload

    def json(self) -> Any:
        try:
            return json.loads(self.payload)
        except ValueError:
            return None

    def problem(self) -> str | None:
        """Why this answer breaks the rule, or None."""
        if self.status >= 500:
            return f"{self.status}: {self.payload[:200]!r}"
        if b"Traceback" in self.payload or b"File \"" in self.payload:
            return f"traceback in a {self.status}"
        if self.status >= 400:
            data = self.json()
            error = data.get("error") if isinstance(data, dict) else None
            if not (isinstance(error, dict) and isinstance(error.get("code"), str)
                    and isinstance(error.get("message"), str) and error["message"]):
                return f"{self.status} without a JSON error: {self.payload[:200]!r}"
        return None


async def send(port: int, method: str, target: str | bytes, *, body: bytes = b"", token: str | None = None,
               authorization: str | None = None, headers: dict[str, str] | None = None) -> Answer:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    target = target.encode("latin-1") if isinstance(target, str) else target
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close",
             b"Content-Length: %d" % len(body)]
    if body:
        lines.append(b"Content-Type: application/json")
    if token:
        lines.append(b"Authorization: Bearer " + token.encode())
    if authorization is not None:
        lines.append(b"Authorization: " + authorization.encode("latin-1"))
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}".encode("latin-1"))

    async def write() -> None:
        try:
            writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
            await writer.drain()
        except ConnectionError:
            pass                             # refused before the body was read: the answer is there
    writing = asyncio.create_task(write())
    raw = b""
    try:                                     # read while writing: an early answer (413) is not lost
        while chunk := await asyncio.wait_for(reader.read(65536), TIMEOUT):
            raw += chunk
    except ConnectionError:
        pass
    await writing
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    if not head:
        return Answer(599, b"", b"connection closed without an answer")
    if b"transfer-encoding: chunked" in head.lower():
        payload = _unchunk(payload)
    return Answer(int(head.split(b" ", 2)[1]), head, payload)


# -- the routes ----------------------------------------------------------------------------------

def api_routes(app) -> list[tuple[str, str]]:
    """(method, OpenAPI path template) of every REST route the app has (the catch-all for unknown
    /api/v1 paths aside)."""
    out = []
    for route in app.router.routes:
        if not route.path.startswith("api/v1/") or route.name.endswith(".unknown_route"):
            continue
        template = re.sub(r"<(\w+)(?::[^>]*)?>", r"{\1}", route.path[len("api/v1"):])
        out += [(method, template) for method in sorted(route.methods) if method not in ("HEAD", "OPTIONS")]
    return sorted(out)


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref:
        node: Any = OPENAPI
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        return node
    return schema


def parameters(method: str, template: str) -> tuple[list[str], list[str], list[tuple[str, ...]]]:
    """(path params, query params, body field paths) of a route, from the OpenAPI document."""
    op = OPENAPI["paths"][template][method.lower()]
    params = op.get("parameters", []) + OPENAPI["paths"][template].get("parameters", [])
    path = [p["name"] for p in params if p["in"] == "path"]
    query = [p["name"] for p in params if p["in"] == "query"]
    fields: list[tuple[str, ...]] = []
    schema = (op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema")

    def walk(node: dict[str, Any], prefix: tuple[str, ...]) -> None:
        for name, sub in _resolve(node).get("properties", {}).items():
            fields.append(prefix + (name,))
            if _resolve(sub).get("type") == "object" and len(prefix) < 3:
                walk(sub, prefix + (name,))
    if schema:
        walk(schema, ())
    return path, query, fields


def sign_identity(identity: Any) -> Any:
    """The host site's signature over a (possibly hostile) identity, as server/auth.check_identity
    computes it, so a fuzzed ``id`` or ``ts`` gets past the signature to the checks after it."""
    if not isinstance(identity, dict):
        return identity
    ident, ts = identity.get("id"), identity.get("ts")
    message = f"{ident}" if ts is None else f"{ident}:{ts}"
    try:
        identity["hash"] = hmac.new(IDENTITY_SECRET.encode(), message.encode(), hashlib.sha256).hexdigest()
    except UnicodeEncodeError:
        identity["hash"] = "0" * 64
    return identity


# -- the fixture: a server with an agent, a visitor and a conversation both may read ----------------

class Target:
    def __init__(self, server, tokens: dict[str, str | None], cid: str) -> None:
        self.server, self.tokens, self.cid = server, tokens, cid
        self.port = server.port
        self.password = "password123"           # of agent "pat", whose password the fuzz changes
        self.failures: list[str] = []
        self.requests = 0
        self.gate = asyncio.Semaphore(24)

    async def check(self, what: str, method: str, target: str | bytes, **kw: Any) -> Answer:
        async with self.gate:
            answer = await send(self.port, method, target, **kw)
        self.requests += 1
        problem = answer.problem()
        if problem:
            self.failures.append(f"{what}: {problem}")
        return answer

    def report(self) -> str:
        return f"{len(self.failures)} of {self.requests} answers break the rule:\n" + "\n".join(self.failures[:40])


@pytest.fixture
async def target(server_factory):
    # failed logins are what the fuzz sends: no 429 after 10 of them, so every login is parsed
    server = await server_factory(login_failures_per_ip_per_min=1_000_000)
    await server.add_agent("kim")
    await server.add_agent("pat")
    agent, _ = await server.agent("kim")
    visitor, welcome = await server.visitor()
    await visitor.message("hello")
    await visitor.send({"type": "handoff"})
    await agent.expect("assigned")          # now kim's: the agent token reads it too
    tokens = {"none": None, "agent": await server.login("kim"), "visitor": welcome["token"]}
    yield Target(server, tokens, welcome["conversation"]["id"])
    await visitor.close()
    await agent.close()


def _valid_path_values(target: Target) -> dict[str, str]:
    return {"conversation_id": target.cid, "bot": "testbot"}


def _base_body(target: Target, template: str) -> dict[str, Any]:
    if template == "/auth/login":
        return {"username": "kim", "password": "password123"}
    if template == "/auth/password":
        return {"old_password": target.password, "new_password": "password456"}
    if template == "/visitor/session":
        return {"identity": sign_identity({"id": "user-1", "ts": int(time.time())})}
    if template == "/bots/{bot}/reply":
        return {"text": "when are you open", "session": "fuzz"}
    if template == "/knowledge/reload":
        return {"bot": "testbot"}
    return {}


def _tokens_for(target: Target, method: str, template: str) -> dict[str, str | None]:
    op = OPENAPI["paths"][template][method.lower()]
    if template == "/auth/password":
        return {"none": None, "agent": PAT}  # pat's token, current at each call (see _password_case)
    if template == "/auth/logout":          # (it takes no input; with kim's token it would end kim's session
        return {k: v for k, v in target.tokens.items() if k != "agent"}   # for the rest: test_security)
    if op.get("security"):
        return target.tokens
    return {k: v for k, v in target.tokens.items() if k != "visitor"}


def _set(body: dict[str, Any], field: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    node = out
    for part in field[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return out
    if value is _DELETE:
        node.pop(field[-1], None)
    else:
        node[field[-1]] = value
    return out


_DELETE = object()
PAT = "(pat's current token)"


def _url(template: str, path_values: dict[str, str], query: str = "") -> str:
    path = "/api/v1" + re.sub(r"\{(\w+)\}", lambda m: path_values[m[1]], template)
    return path + ("?" + query if query else "")


async def _password_case(target: Target, what: str, body: dict[str, Any]) -> None:
    """/auth/password changes pat's password when the hostile new one is acceptable: keep up."""
    token = await target.server.login("pat", target.password)
    answer = await target.check(what, "POST", "/api/v1/auth/password", token=token,
                                body=json.dumps(body).encode())
    if answer.status == 200:
        target.password = body["new_password"]


# -- the tests -------------------------------------------------------------------------------------

async def test_every_api_route_is_in_openapi_so_it_is_fuzzed(server):
    routes = api_routes(server.app)
    described = sorted((m.upper(), p) for p, ops in OPENAPI["paths"].items() for m in ops if m != "parameters")
    assert routes == described
    for method, template in routes:
        path, _, _ = parameters(method, template)
        assert set(path) <= set(_valid_path_values(Target(server, {}, "x"))), (template, path)


async def test_messages_after_above_int64_is_400_naming_the_rule_not_500(target):
    """The issue's first report: after=2**63 overflowed the database driver (500)."""
    url = f"/api/v1/conversations/{target.cid}/messages"
    for token in (target.tokens["agent"], target.tokens["visitor"]):
        for value in (2 ** 63, 2 ** 64, 10 ** 30, -1):
            answer = await send(target.port, "GET", f"{url}?after={value}", token=token)
            assert answer.status == 400, (value, answer.payload)
            assert answer.json() == {"error": {"code": "bad_request",
                                               "message": f"after must be an integer from 0 to {INT_MAX}"}}
        answer = await send(target.port, "GET", f"{url}?after={INT_MAX}", token=token)
        assert answer.status == 200 and answer.json()["messages"] == []
        answer = await send(target.port, "GET", f"{url}?after=0&limit={2 ** 63}", token=token)
        assert answer.status == 400 and "limit must be an integer from 0 to" in answer.json()["error"]["message"]
        answer = await send(target.port, "GET", f"{url}?after=0&limit=1000", token=token)   # capped at 200
        assert answer.status == 200 and answer.json()["messages"][0]["seq"] == 1


async def test_integer_and_number_query_values_are_ascii_digits_within_int64(target):
    token = target.tokens["agent"]
    for query, message in (
            ("limit=%EF%BC%91", f"limit must be an integer from 0 to {INT_MAX}"),     # fullwidth 1
            ("limit=%201", f"limit must be an integer from 0 to {INT_MAX}"),
            ("limit=1_0", f"limit must be an integer from 0 to {INT_MAX}"),
            ("limit=%00", f"limit must be an integer from 0 to {INT_MAX}"),
            ("before=nan", f"before must be a number (unix seconds) from 0 to {INT_MAX}"),
            ("before=1e400", f"before must be a number (unix seconds) from 0 to {INT_MAX}"),
            ("before=-1", f"before must be a number (unix seconds) from 0 to {INT_MAX}"),
            ("before=inf", f"before must be a number (unix seconds) from 0 to {INT_MAX}")):
        answer = await send(target.port, "GET", f"/api/v1/conversations?{query}", token=token)
        assert answer.status == 400 and answer.json()["error"]["message"] == message, (query, answer.payload)
    for query in ("limit=200", f"limit={INT_MAX}", "before=1733456789.25", "before=1.7e9", "before=1e18", "before=.5"):
        answer = await send(target.port, "GET", f"/api/v1/conversations?state=queued&{query}", token=token)
        assert answer.status == 200, (query, answer.payload)


async def test_static_path_with_nul_or_odd_bytes_is_404_json_not_500(server):
    """The issue's second report: a NUL in a static path (and a name too long for the file
    system) raised in Sanic's static handler (500)."""
    for path in ("/static/%00", "/static/chat.js%00", "/static/a%00b", "/static/%ff", "/static/%c3%28",
                 "/static/" + "a" * 300, "/static/" + "a/" * 1000, "/static/..%2fapi.py", "/static/../api.py",
                 "/static/.%2e/app.py", "/static/%2e%2e/app.py", "/static/.hidden", "/static/chat.js/",
                 "/static/chat.js%2f", "/static/CHAT.JS", "/static/nope.js", "/static/%5c..%5capp.py"):
        for method in ("GET", "HEAD"):
            answer = await send(server.port, method, path)
            assert answer.status in (400, 404), (method, path, answer.status, answer.payload[:200])
            if method == "GET":
                assert answer.problem() is None, (path, answer.problem())
    answer = await send(server.port, "GET", "/static/chat.js")
    assert answer.status == 200 and re.search(rb"content-type: (application|text)/javascript; charset=utf-8",
                                              answer.head.lower())
    assert answer.payload == (ROOT / "server" / "static" / "chat.js").read_bytes()
    answer = await send(server.port, "HEAD", "/static/chat.css")
    assert answer.status == 200 and answer.payload == b"" and b"text/css" in answer.head
    modified = re.search(rb"(?i)last-modified: ([^\r]+)", answer.head)[1].decode()
    answer = await send(server.port, "GET", "/static/chat.css", headers={"If-Modified-Since": modified})
    assert answer.status == 304


async def test_hostile_path_query_and_body_values_never_give_5xx_on_any_api_route(target):
    for method, template in api_routes(target.server.app):
        path_params, query_params, fields = parameters(method, template)
        valid = _valid_path_values(target)
        for token_name, token in _tokens_for(target, method, template).items():
            cases: list[tuple[str, str, bytes | None]] = []
            base = json.dumps(_base_body(target, template)).encode() if method == "POST" else b""
            for name in path_params:
                cases += [(f"path {name}={v[:40]!r}", _url(template, {**valid, name: v}), base) for v in URL_VALUES]
            for name in query_params:
                cases += [(f"query {name}={v[:40]!r}", _url(template, valid, f"{name}={v}"), base)
                          for v in URL_VALUES]
            for field in fields:
                for value in JSON_VALUES + [_DELETE]:
                    body = _set(_base_body(target, template), field, value)
                    if template == "/visitor/session" and field[-1] != "hash":
                        body["identity"] = sign_identity(body.get("identity"))
                    shown = "(absent)" if value is _DELETE else repr(value)[:40]
                    cases.append((f"body {'.'.join(field)}={shown}", None, body))    # type: ignore[arg-type]
            jobs = []
            for what, url, body in cases:
                what = f"{method} {template} [{token_name}] {what}"
                if token == PAT:
                    await _password_case(target, what, body)      # (body fields only: a dict)
                    continue
                payload = json.dumps(body).encode() if isinstance(body, dict) else body or b""
                jobs.append(target.check(what, method, url or _url(template, valid), body=payload, token=token))
            await asyncio.gather(*jobs)
    assert not target.failures, target.report()
    assert target.requests > 1500


async def test_bodies_that_are_not_a_json_object_are_400_on_every_post_route(target):
    for method, template in api_routes(target.server.app):
        if method != "POST":
            continue
        url = _url(template, _valid_path_values(target))
        token = await target.server.login("kim")
        for raw in RAW_BODIES:
            answer = await target.check(f"{template} body {raw[:30]!r}", method, url, body=raw, token=token)
            if not _is_json_object(raw):
                assert answer.status == 400, (template, raw[:30], answer.status)
                assert answer.json()["error"]["message"] in ("body is not valid JSON", "body must be a JSON object")
    assert not target.failures, target.report()


def _is_json_object(raw: bytes) -> bool:
    """Whether ``raw`` is a JSON object (an empty body counts as ``{}``), NaN and Infinity not JSON."""
    def refuse(constant: str) -> Any:
        raise ValueError(constant)
    try:
        return isinstance(json.loads(raw or b"{}", parse_constant=refuse), dict)
    except (ValueError, RecursionError):
        return False


async def test_json_nan_and_infinity_are_not_json(target):
    answer = await send(target.port, "POST", "/api/v1/bots/testbot/reply", body=b'{"text": "hi", "session": NaN}')
    assert answer.status == 400 and answer.json()["error"]["message"] == "body is not valid JSON"


async def test_bad_authorization_headers_are_401_never_5xx(target):
    for method, template in api_routes(target.server.app):
        if not OPENAPI["paths"][template][method.lower()].get("security"):
            continue
        url = _url(template, _valid_path_values(target))
        for header in BAD_AUTH:
            answer = await target.check(f"{method} {template} Authorization={header[:30]!r}", method, url,
                                        authorization=header, body=b"{}" if method == "POST" else b"")
            assert answer.status == 401, (template, header, answer.status)
    assert not target.failures, target.report()


async def test_string_body_fields_reject_nul_and_lone_surrogates_with_400_naming_the_field(target):
    cases = [("/api/v1/auth/login", None, {"username": "kim\x00", "password": "password123"}, "username"),
             ("/api/v1/auth/login", None, {"username": "k\ud800", "password": "password123"}, "username"),
             ("/api/v1/auth/login", None, {"username": "kim", "password": "\ud800" * 8}, "password"),
             ("/api/v1/auth/password", "pat", {"old_password": "x", "new_password": "\ud800" * 8}, "new_password"),
             ("/api/v1/bots/testbot/reply", None, {"text": "hi\x00"}, "text"),
             ("/api/v1/bots/testbot/reply", None, {"text": "hi", "session": "s\x00"}, "session"),
             ("/api/v1/bots/testbot/reply", None, {"text": "hi", "session": ["s"]}, "session"),
             ("/api/v1/knowledge/reload", "kim", {"bot": "test\x00bot"}, "bot")]
    for url, agent, body, name in cases:
        token = await target.server.login(agent) if agent else None
        answer = await send(target.port, "POST", url, body=json.dumps(body).encode(), token=token)
        assert answer.status == 400, (url, body, answer.payload)
        assert answer.json()["error"]["message"].startswith(name + " must be"), (url, answer.payload)


async def test_signed_identity_with_a_hostile_id_or_ts_is_401_never_5xx(target):
    """A host site's signature does not make its fields sane: a timestamp too large for a float
    (OverflowError), NaN (passed the age check), a NUL or a lone surrogate in the id."""
    now = int(time.time())
    for identity in ({"id": "user-1", "ts": 10 ** 400}, {"id": "user-1", "ts": float("inf")},
                     {"id": "user-1", "ts": -float("inf")}, {"id": "user-1", "ts": 2 ** 64},
                     {"id": "us\x00er", "ts": now}, {"id": "us\ud800er", "ts": now}, {"id": "user-1", "ts": "now"},
                     {"id": "user-1", "ts": "\ud800"}, {"id": "x" * 201, "ts": now},
                     {"id": "user-1", "ts": now, "hash": "\ud800"}):
        body = {"identity": identity if "hash" in identity else sign_identity(dict(identity))}
        # infinity as JSON can write it: a number too large for a double (NaN it cannot: see above)
        raw = json.dumps(body).replace("-Infinity", "-1e999").replace("Infinity", "1e999").encode()
        answer = await send(target.port, "POST", "/api/v1/visitor/session", body=raw)
        assert answer.status == 401 and answer.problem() is None, (identity, answer.status, answer.payload[:200])
    nan = json.dumps({"identity": sign_identity({"id": "user-1", "ts": float("nan")})}).encode()
    answer = await send(target.port, "POST", "/api/v1/visitor/session", body=nan)
    assert answer.status == 400 and answer.json()["error"]["message"] == "body is not valid JSON"
    answer = await send(target.port, "POST", "/api/v1/visitor/session",
                        body=json.dumps({"identity": sign_identity({"id": "user-1", "ts": now})}).encode())
    assert answer.status == 200 and answer.json()["verified"] is True


async def test_unknown_api_paths_are_json_404(target):
    for path in ("/api/v1/nope", "/api/v1/conversations//messages", "/api/v1/bots/testbot", "/api/v1/%00",
                 "/api/v1/bots//reply", "/api/v1/conversations/x/messages/y", "/api/v1/" + "x" * 4000):
        for method in ("GET", "POST", "DELETE"):
            answer = await target.check(f"{method} {path[:60]}", method, path, token=target.tokens["agent"])
            assert answer.status == 404, (method, path, answer.status)
            assert answer.json()["error"]["code"] == "not_found"
    assert not target.failures, target.report()


async def test_raw_bytes_outside_ascii_in_the_request_line_are_refused_never_5xx(target):
    """Refused by Sanic's HTTP parser before any route runs: 400 "URL may only contain US-ASCII
    characters" (its own error body), or for a control byte the connection closed unanswered."""
    for raw in (b"/api/v1/conversations/\xff\xfe", b"/api/v1/conversations?state=\xff", b"/static/\xff",
                b"/api/v1/conversations/" + target.cid.encode() + b"/messages?after=\xc3\x28",
                b"/static/chat.js\x7f", b"/static/chat.js\x00", b"/api/v1/bots?x=\x01"):
        answer = await send(target.port, "GET", raw, token=target.tokens["agent"])
        assert answer.status in (400, 599) and b"Traceback" not in answer.payload, (raw, answer.status)


async def test_oversized_request_head_or_body_is_413_never_5xx(target):
    """Refused by Sanic itself before any route runs (so its error body is Sanic's own)."""
    url = f"/api/v1/conversations/{target.cid}/messages?after=" + "9" * 100_000
    answer = await send(target.port, "GET", url, token=target.tokens["agent"])
    assert answer.status == 413 and b"Traceback" not in answer.payload
    body = json.dumps({"text": "x" * (2 * 1024 * 1024)}).encode()
    answer = await send(target.port, "POST", "/api/v1/bots/testbot/reply", body=body)
    assert answer.status == 413 and b"Traceback" not in answer.payload


async def test_what_sanic_refuses_before_any_route_is_our_json_error_too(server):
    """Rule: an unknown page and a wrong method get the same JSON error body as every API error
    (Sanic's own answers were text), never a 5xx (an oversized body: see the 413 test above)."""
    from .conftest import http_request

    for method, path, body, status, code in (
            ("GET", "/nope", None, 404, "not_found"),
            ("GET", "/console%00", None, 404, "not_found"),
            ("DELETE", "/api/v1/bots", None, 405, "method_not_allowed")):
        got, data = await http_request(server.port, method, path, json_body=body)
        assert (got, isinstance(data, dict) and data["error"]["code"]) == (status, code), (method, path, data)


async def test_a_token_that_is_not_ascii_is_refused_on_the_sockets_not_an_internal_error(server):
    """Rule: a hello whose token holds characters a token never has (a lone surrogate) is
    ``unauthorized`` and closed 4001, like any malformed token."""
    from .test_security import closed_with

    for path in ("/ws/agent", "/ws/visitor"):
        client = await server.connect(path)
        await client.send(json.dumps({"type": "hello", "token": "\ud800.x"}, ensure_ascii=True))
        err = await client.expect("error")
        assert err["code"] == "unauthorized"
        assert await closed_with(client) == 4001
