"""REST API under /api/v1, plus /healthz and /metrics.  Described in server/openapi.json.

Auth: ``Authorization: Bearer <token>`` (an agent token from /api/v1/auth/login or a visitor
token from /api/v1/visitor/session or the visitor socket's welcome frame).  Every read of a
conversation is checked against the caller; unknown and foreign ids both answer 404 (an
agent's read of another team's queued conversation also writes an audit entry).
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import math
import re
import secrets
from pathlib import Path
from typing import Any

from engine import InputError, KefuError
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json as json_response, text as text_response

from .audit import audit
from .auth import check_identity, hash_password, new_visitor_id, verify_password
from .errors import BadRequest, NotFound, RateLimited, Unauthorized
from .storage.base import QUEUED, Agent, Conversation
from .views import agent_dict, conversation_dict
from .ws import client_ip

bp = Blueprint("api", url_prefix="/api/v1")
ops = Blueprint("ops")

MAX_LIMIT = 200
#: The largest integer a query parameter may carry: what every database driver takes (BIGINT).
INT_MAX = 2 ** 63 - 1
_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def body(request: Request) -> dict[str, Any]:
    try:
        # NaN and Infinity are not JSON (as on the sockets); a deeply nested array is a
        # RecursionError, not a ValueError
        data = json.loads(request.body or b"{}", parse_constant=_not_json)
    except (ValueError, RecursionError):
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def _clean(value: str) -> bool:
    """No NUL (refused by PostgreSQL and by file names) and no lone surrogate (a JSON
    ``"\\ud800"`` escape: it cannot be encoded, so hashing or storing it raised)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value: Any, name: str, *, max_len: int, min_len: int = 1, error: type[InputError] = BadRequest) -> str:
    """A string field of ``min_len``..``max_len`` characters, else 400 naming the field and the rule."""
    if not isinstance(value, str) or not min_len <= len(value) <= max_len or not _clean(value):
        raise error(f"{name} must be a string of {min_len} to {max_len} characters (valid Unicode, no NUL)")
    return value


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer "):
        raise Unauthorized("missing bearer token")
    token = header[7:].strip()
    if not (token.isascii() and token.isprintable()):    # (bytes that are not ASCII came in as surrogates)
        raise Unauthorized("malformed token")
    return token


async def agent_of(request: Request) -> Agent:
    ctx = request.app.ctx
    agent_id, version = ctx.tokens.open_agent(_bearer(request))
    agent = await ctx.storage.get_agent(agent_id=agent_id)
    if agent is None or agent.token_version != version:
        raise Unauthorized("token revoked")
    return agent


async def caller_of(request: Request) -> tuple[str, str, str | None]:
    """("agent", agent_id, team) or ("visitor", visitor_id, None)."""
    token = _bearer(request)
    ctx = request.app.ctx
    try:
        visitor_id, _ = ctx.tokens.open_visitor(token)
        return "visitor", visitor_id, None
    except Unauthorized:
        pass
    agent = await agent_of(request)
    return "agent", agent.id, agent.team


def team_of(request: Request, conv: Conversation) -> str:
    """A conversation's team: its bot's (``[server] bot_teams``), else "default"."""
    return request.app.ctx.router.team_of_bot(conv.bot)


def can_read(kind: str, who: str, conv: Conversation, team: str | None = None,
             conv_team: str = "default") -> bool:
    if kind == "visitor":
        return conv.visitor_id == who
    # agents: their own conversations, and their team's queue (to pick from it)
    return conv.agent_id == who or (conv.state == QUEUED and conv.agent_id is None
                                    and (team or "default") == conv_team)


def _int_arg(request: Request, name: str, default: int | None, maximum: int | None = None) -> int | None:
    """A query parameter of ASCII digits, 0..INT_MAX (above, the database driver overflowed:
    500); above ``maximum`` it is capped."""
    raw = request.args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19 and int(raw) <= INT_MAX):
        raise BadRequest(f"{name} must be an integer from 0 to {INT_MAX}")
    value = int(raw)
    return min(value, maximum) if maximum else value


def _number_arg(request: Request, name: str, what: str = "a number") -> float | None:
    """A query parameter that is a plain decimal number, 0..INT_MAX (no NaN, no infinity)."""
    raw = request.args.get(name)
    if raw is None:
        return None
    value = float(raw) if len(raw) <= 64 and _NUMBER.fullmatch(raw) else math.nan
    if not 0 <= value <= INT_MAX:
        raise BadRequest(f"{name} must be {what} from 0 to {INT_MAX}")
    return value


async def agents_with_presence(agents: list[Agent], router: Any) -> list[dict[str, Any]]:
    """Each agent's account fields plus presence and load from the router (read once)."""
    info = {a.agent_id: a for a in await router.agents()}
    out = []
    for agent in agents:
        a = info.get(agent.id)
        out.append({**agent_dict(agent), "presence": a.status if a and a.sockets else "offline",
                    "load": a.load if a else 0})
    return out


# -- auth ------------------------------------------------------------------------------

@bp.post("/auth/login")
async def login(request: Request) -> HTTPResponse:
    ctx = request.app.ctx
    ip = client_ip(request)
    if await ctx.login_failures.over(ip):
        raise RateLimited("too many failed logins; wait a minute")
    data = body(request)
    username, password = data.get("username"), data.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        raise BadRequest("username and password are required")
    _text(username, "username", max_len=200)
    _text(password, "password", max_len=1024, min_len=0)
    # Per account too, so guesses spread over many addresses are slowed down; a window, so
    # someone else's guesses never lock the account for longer than a minute.  (Said for
    # unknown usernames alike, so it does not reveal which exist.)
    account = "a:" + hashlib.sha256(username.casefold().encode()).hexdigest()[:32]
    if await ctx.account_login_failures.over(account):
        raise RateLimited("too many failed logins for this account; wait a minute")
    agent = await ctx.storage.get_agent(username=username)
    # verify even for an unknown user, so timing does not reveal which usernames exist
    ok = await asyncio.to_thread(verify_password, password, agent.password_hash if agent else ctx.dummy_hash)
    if agent is None or not ok:
        await ctx.login_failures.hit(ip)
        await ctx.account_login_failures.hit(account)
        raise Unauthorized("wrong username or password")
    ttl = ctx.settings.agent_token_ttl_s
    return json_response({"token": ctx.tokens.agent_token(agent.id, agent.token_version), "expires_in": ttl,
                          "agent": agent_dict(agent)})


@bp.post("/auth/password")
async def change_password(request: Request) -> HTTPResponse:
    """Change one's password: bumps token_version, so every older token (and socket) dies."""
    ctx = request.app.ctx
    agent = await agent_of(request)
    data = body(request)
    old, new = data.get("old_password"), data.get("new_password")
    if not isinstance(old, str) or not isinstance(new, str) or len(new) < 8 or len(new) > 1024:
        raise BadRequest("old_password and new_password (8+ characters) are required")
    _text(old, "old_password", max_len=1024, min_len=0)
    _text(new, "new_password", max_len=1024, min_len=8)
    if not await asyncio.to_thread(verify_password, old, agent.password_hash):
        raise Unauthorized("wrong password")
    new_hash = await asyncio.to_thread(hash_password, new)
    updated = await ctx.storage.update_agent(agent.id, password_hash=new_hash)
    ctx.agents.revoke(agent.id)
    return json_response({"token": ctx.tokens.agent_token(agent.id, updated.token_version)})


@bp.post("/auth/logout")
async def logout(request: Request) -> HTTPResponse:
    """End the agent's sessions: every token issued so far stops working, and their open
    sockets, on every worker, are closed with 4002."""
    ctx = request.app.ctx
    body(request)                   # (none needed; a body that is not a JSON object is still a 400)
    agent = await agent_of(request)
    await ctx.storage.update_agent(agent.id, revoke_tokens=True)
    ctx.agents.revoke(agent.id)
    return json_response({"logged_out": True})


@bp.post("/visitor/session")
async def visitor_session(request: Request) -> HTTPResponse:
    """A visitor token; with ``identity`` (signed by the host site) a verified one.
    A bad identity answers 401 and changes nothing."""
    ctx = request.app.ctx
    if not await ctx.visitor_sessions.hit(client_ip(request)):
        raise RateLimited("too many new visitor sessions from this address; wait a minute")
    data = body(request)
    identity = data.get("identity")
    verified = None
    if identity is not None:
        _sane_identity(identity)
        verified = check_identity(ctx.settings.identity_secret, identity,
                                  max_age_s=ctx.settings.identity_max_age_s)
        visitor_id = ctx.tokens.verified_visitor_id(verified)
    else:
        visitor_id = new_visitor_id()
    return json_response({"visitor": visitor_id, "verified": verified is not None,
                          "token": ctx.tokens.visitor_token(visitor_id, verified=verified)})


def _sane_identity(identity: Any) -> None:
    """What check_identity cannot take, refused as a bad identity (401) before it: text that
    cannot be encoded (hashing it raised) or holds a NUL, a timestamp beyond a float (float()
    overflowed) or NaN (it passed the age check)."""
    if not isinstance(identity, dict):
        return                              # check_identity says so
    for name in ("id", "ts", "hash"):
        value = identity.get(name)
        if isinstance(value, str) and not _clean(value):
            raise Unauthorized(f"identity {name} must be valid Unicode without NUL")
    ts = identity.get("ts")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool) and not -INT_MAX <= ts <= INT_MAX:
        raise Unauthorized("identity timestamp outside the accepted window")


# -- conversations -----------------------------------------------------------------------

@bp.get("/conversations")
async def list_conversations(request: Request) -> HTTPResponse:
    ctx = request.app.ctx
    kind, who, team = await caller_of(request)
    limit = _int_arg(request, "limit", 50, MAX_LIMIT) or 50
    before = _number_arg(request, "before", "a number (unix seconds)")
    state = request.args.get("state")
    if state is not None and state not in ("bot", "queued", "human", "closed"):
        raise BadRequest("state must be one of bot, queued, human, closed")
    if kind == "visitor":
        convs = await ctx.storage.list_conversations(visitor_id=who, state=state, limit=limit, before=before)
    elif state == QUEUED:
        convs = await ctx.storage.list_conversations(state=QUEUED, limit=limit, before=before)
    else:
        convs = await ctx.storage.list_conversations(agent_id=who, state=state, limit=limit, before=before)
    return json_response({"conversations": [conversation_dict(c) for c in convs
                                            if can_read(kind, who, c, team, team_of(request, c))]})


async def _readable(request: Request, conversation_id: str) -> Conversation:
    kind, who, team = await caller_of(request)
    # (the id as it came in the path, percent-escapes and all): one that no conversation can
    # have (too long, control characters) is simply unknown
    plausible = len(conversation_id) <= 64 and conversation_id.isprintable()
    conv = await request.app.ctx.storage.get_conversation(conversation_id) if plausible else None
    if conv is None:
        raise NotFound("no such conversation")
    conv_team = team_of(request, conv)
    if not can_read(kind, who, conv, team, conv_team):
        if kind == "agent" and conv.state == QUEUED and conv.agent_id is None:   # another team's queue
            audit(request.app.ctx.metrics, "read", agent=who, conversation=conv.id,
                  agent_team=team, conversation_team=conv_team)
        raise NotFound("no such conversation")
    return conv


@bp.get("/conversations/<conversation_id:str>")
async def get_conversation(request: Request, conversation_id: str) -> HTTPResponse:
    return json_response(conversation_dict(await _readable(request, conversation_id)))


@bp.get("/conversations/<conversation_id:str>/messages")
async def get_messages(request: Request, conversation_id: str) -> HTTPResponse:
    conv = await _readable(request, conversation_id)
    after = _int_arg(request, "after", 0) or 0
    limit = _int_arg(request, "limit", 100, MAX_LIMIT) or 100
    msgs = await request.app.ctx.storage.messages(conv.id, after_seq=after, limit=limit)
    return json_response({"conversation": conv.id, "last_seq": conv.last_seq,
                          "messages": [m.as_dict() for m in msgs],
                          "next_after": msgs[-1].seq if len(msgs) == limit else None})


# -- agents, bots, knowledge ----------------------------------------------------------------

@bp.get("/agents")
async def list_agents(request: Request) -> HTTPResponse:
    me = await agent_of(request)
    ctx = request.app.ctx
    return json_response({"agents": await agents_with_presence(await ctx.storage.list_agents(), ctx.router),
                          "queue": await ctx.router.queue(me.team)})


@bp.get("/agents/me")
async def me(request: Request) -> HTTPResponse:
    agent = await agent_of(request)
    return json_response((await agents_with_presence([agent], request.app.ctx.router))[0])


@bp.get("/bots")
async def bots(request: Request) -> HTTPResponse:
    engine = request.app.ctx.engine
    return json_response({"bots": [{"name": n, "greeting": engine.greeting(n)} for n in sorted(engine.bots)]})


@bp.post("/bots/<bot:str>/reply")
async def bot_reply(request: Request, bot: str) -> HTTPResponse:
    """Stateless: one turn, answered with the same fields as ``kefu ask --json``."""
    ctx = request.app.ctx
    if not await ctx.reply_limit.hit(client_ip(request)):
        raise RateLimited("too many bot requests from this address")
    data = body(request)
    # No session: a one-off turn, with memory nobody else shares (not a common "default"
    # session in which unrelated callers would read each other's slots).
    text, session = data.get("text"), data.get("session")
    session = "once-" + secrets.token_hex(8) if session in (None, "") else _text(session, "session", max_len=64)
    # (blank text: the engine's own bad_input)
    _text(text, "text", max_len=ctx.settings.max_text_chars, min_len=0, error=InputError)
    # "api:" keeps these sessions apart from the conversations' own memory
    turn = await asyncio.wait_for(ctx.engine.handle(bot, text, session="api:" + session),
                                  ctx.settings.bot_timeout_s)
    out = turn.as_dict()
    out["session"] = session
    return json_response(out)


@bp.post("/knowledge/reload")
async def reload_knowledge(request: Request) -> HTTPResponse:
    await agent_of(request)
    data = body(request)
    bot = data.get("bot")
    if bot is not None:
        _text(bot, "bot", max_len=200, min_len=0)
    results = request.app.ctx.engine.reload(bot)
    status = {name: ("ok" if err is None else [str(p) for p in err.problems]) for name, err in results.items()}
    return json_response({"reloaded": status}, status=200 if all(v == "ok" for v in status.values()) else 422)


@bp.route("/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"], name="unknown_route")
async def unknown_route(request: Request, path: str) -> HTTPResponse:
    """Any other path under /api/v1: a JSON 404 like every other API error (Sanic's own is text)."""
    raise NotFound("no such API route")


@functools.cache
def _openapi_text() -> str:
    return Path(__file__).with_name("openapi.json").read_text(encoding="utf-8")


@bp.get("/openapi.json")
async def openapi(request: Request) -> HTTPResponse:
    return HTTPResponse(_openapi_text(), content_type="application/json")


# -- operations -------------------------------------------------------------------------------

@ops.get("/healthz")
async def healthz(request: Request) -> HTTPResponse:
    ctx = request.app.ctx
    try:
        await ctx.storage.get_conversation("0" * 32)
        storage = "ok"
    except Exception as exc:  # reads failing: not healthy
        storage = f"error: {type(exc).__name__}"
    broker = ctx.broker.status()
    ok = storage == "ok"
    # Redis away: still serving (messages are stored and acked, delivery between workers and
    # routing wait for it), so "degraded" but 200: a load balancer must not take every node out.
    status = "ok" if ok and broker["connected"] else "degraded"
    return json_response({"status": status, "storage": storage, "broker": broker,
                          "bots": sorted(ctx.engine.bots), "connections": len(ctx.registry.connections),
                          "node": ctx.sessions.node},
                         status=200 if ok else 503)


@ops.get("/metrics")
async def metrics(request: Request) -> HTTPResponse:
    ctx = request.app.ctx
    wanted = ctx.settings.metrics_token
    if wanted:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {wanted}".encode()):
            raise Unauthorized("metrics need server.metrics_token as a bearer token")
    text = await ctx.shared_metrics.render() if ctx.shared_metrics is not None else ctx.metrics.render()
    return text_response(text, content_type="text/plain; version=0.0.4; charset=utf-8")


def error_body(code: str, message: str, status: int, headers: Any = None) -> HTTPResponse:
    """The one shape of every REST error: ``{"error": {"code", "message"}}``."""
    return json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


def error_response(request: Request, exc: KefuError) -> HTTPResponse:
    status = int(getattr(exc, "status_code", 500) or 500)
    return error_body(exc.code, exc.message if status < 500 else "internal error", status)


#: Sanic's own refusals (no route, wrong method, head or body too large, a bad request line):
#: (code, message) a client can act on.
_SANIC_ERRORS = {400: ("bad_request", "bad request"), 404: ("not_found", "no such page"),
                 405: ("method_not_allowed", "method not allowed here"), 408: ("timeout", "request took too long"),
                 413: ("too_large", "request too large"), 416: ("bad_range", "bad range")}


def sanic_error_response(request: Any, exc: Exception) -> HTTPResponse:
    """The same JSON error body as ours for what Sanic refuses before a handler runs (its own
    answers were text or HTML); its status is kept, its wording (which may name internals)
    is not."""
    status = int(getattr(exc, "status_code", 500) or 500)
    if status >= 500:
        code, message = "internal", "internal error"
    else:
        code, message = _SANIC_ERRORS.get(status, ("refused", "request refused"))
    return error_body(code, message, status, dict(getattr(exc, "headers", None) or {}))
