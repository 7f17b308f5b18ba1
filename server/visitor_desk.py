"""The visitor's frames: hello (who they are, which conversation), messages, asking for a
person, closing, type-ahead.

Rules kept here (docs/protocol.md is the client-facing description):

* A message is stored (durable) before it is acknowledged; the ack carries its seq and
  echoes the client's id; a client id sent twice is stored once.
* The sender's identity comes from the socket's session, never from the frame.
* Unknown and foreign conversation ids are indistinguishable (``not_found``).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from engine import Engine

from . import protocol as P
from .auth import Tokens, check_identity, new_visitor_id
from .bot_turns import BotTurns
from .config import Settings
from .connections import Connection
from .conversations import ConvState, Conversations
from .errors import NotFound, Unauthorized
from .limits import WindowCounter
from .metrics import Metrics
from .storage.base import BOT, CLOSED, Storage, StoredMessage

if TYPE_CHECKING:
    from .agent_desk import AgentDesk
    from .sessions import Sessions


class VisitorDesk:
    def __init__(self, settings: Settings, *, engine: Engine, hub: Conversations, storage: Storage,
                 tokens: Tokens, bots: BotTurns, metrics: Metrics, new_conversations: WindowCounter) -> None:
        self.s, self.engine, self.hub, self.storage, self.tokens, self.bots, self.metrics = (
            settings, engine, hub, storage, tokens, bots, metrics)
        self.new_conversations = new_conversations
        self.sessions: Sessions          # set at wiring (they refer to each other)
        self.agents: AgentDesk
        self.handlers = {"hello": self.hello, "message": self.message, "handoff": self.handoff,
                         "close": self.close, "suggest": self.suggest}

    def conversation_of(self, conn: Connection, frame: dict[str, Any] | None = None) -> ConvState:
        """A visitor socket is in one conversation."""
        for cid in conn.conversations:
            c = self.hub.convs.get(cid)
            if c is not None:
                return c
        raise NotFound("no conversation on this connection")

    async def disconnected(self, conn: Connection) -> None:
        return None

    async def hello(self, conn: Connection, frame: dict[str, Any]) -> None:
        s = self.s
        identity, token = frame.get("identity"), frame.get("token")
        verified = None
        try:
            if identity is not None:
                verified = check_identity(s.identity_secret, identity, max_age_s=s.identity_max_age_s)
                visitor_id = self.tokens.verified_visitor_id(verified)
            elif token is not None:
                visitor_id, verified = self.tokens.open_visitor(token)
            else:
                visitor_id = new_visitor_id()
        except Unauthorized as exc:
            return self.sessions.refuse(conn, P.UNAUTHORIZED, exc.message, P.CLOSE_UNAUTHORIZED)
        wanted = P.get_str(frame, "conversation", required=False, max_len=64)
        last_seq = P.get_int(frame, "last_seq", required=False, default=0)
        start_new = P.get_bool(frame, "new", False)
        bot = P.get_str(frame, "bot", required=False, max_len=64)
        c: ConvState | None = None
        if wanted:
            try:
                c = await self.hub.get(wanted)
            except NotFound:
                c = None
            if c is None or c.visitor_id != visitor_id:
                return self.sessions.refuse(conn, P.NOT_FOUND, "no such conversation", P.CLOSE_NOT_FOUND)
        elif not start_new and (token is not None or identity is not None):
            recent = await self.storage.list_conversations(visitor_id=visitor_id, limit=1)
            if recent and recent[0].state != CLOSED and (bot is None or recent[0].bot == bot):
                c = self.hub.state_of(recent[0])
        created = False
        if c is None:
            bot = bot or self.default_bot()
            if bot not in self.engine.bots:
                return self.sessions.refuse(conn, P.NOT_FOUND, f"unknown bot {bot!r}", P.CLOSE_NOT_FOUND)
            if not await self.new_conversations.hit(conn.ip):
                return self.sessions.refuse(conn, P.RATE_LIMITED, "too many new conversations from this address",
                                            P.CLOSE_RATE_LIMITED)
            meta = {"verified_id": verified} if verified else {}
            conv = await self.storage.create_conversation(visitor_id, bot, meta=meta)
            c = self.hub.state_of(conv)
            created = True
        conn.visitor_id = visitor_id
        self.sessions.authenticated(conn)
        conn.send({"type": "welcome", "visitor": visitor_id, "verified": bool(verified),
                   "token": self.tokens.visitor_token(visitor_id, verified=verified),
                   "conversation": c.summary(), "agent_name": await self.agents.name_of(c.agent_id),
                   "features": ["suggest"], "node": self.sessions.node})
        if created:
            greeting = self.engine.greeting(c.bot)
            if greeting:
                await self.hub.append(c, role="bot", sender=c.bot, text=greeting, kind="greeting")
        await self.hub.subscribe(conn, c, last_seq or 0)

    def default_bot(self) -> str:
        return self.s.default_bot or next(iter(self.engine.bots), "")

    async def message(self, conn: Connection, frame: dict[str, Any]) -> None:
        arrived = time.perf_counter()
        client_id = P.get_str(frame, "id", max_len=self.s.max_client_id_chars)
        text = P.get_text(frame, self.s.max_text_chars)
        c = self.conversation_of(conn)
        if c.state == CLOSED:
            raise P.FrameError(P.BAD_STATE, "the conversation is closed; start a new one", client_id)
        msg, new = await self.hub.append(c, role="visitor", sender=conn.visitor_id or "", text=text,
                                         client_id=client_id, exclude=conn)
        ack(conn, msg, client_id, new, arrived, self.metrics)
        if new and c.state == BOT:
            self.bots.start_turn(c, text)

    async def handoff(self, conn: Connection, frame: dict[str, Any]) -> None:
        c = self.conversation_of(conn)
        if c.state == BOT:
            await self.bots.handoff(c, "asked")
        else:
            conn.send({"type": "state", "conversation": c.id, "event": "unchanged", "state": c.state})

    async def close(self, conn: Connection, frame: dict[str, Any]) -> None:
        await self.agents.close_conversation(self.conversation_of(conn), agent_id=None, by="visitor")

    async def suggest(self, conn: Connection, frame: dict[str, Any]) -> None:
        """Type-ahead: FAQ questions and examples starting like the visitor's text."""
        c = self.conversation_of(conn)
        prefix = P.get_str(frame, "prefix", max_len=100) or ""
        limit = P.get_int(frame, "limit", required=False, default=5, minimum=1, maximum=10) or 5
        items = self.engine.suggest(c.bot, prefix, limit) if prefix.strip() else []
        conn.send({"type": "suggestions", "conversation": c.id, "prefix": prefix, "items": list(items)})


def ack(conn: Connection, msg: StoredMessage, client_id: str | None, new: bool, arrived: float,
        metrics: Metrics) -> None:
    """The stored message's seq to its sender (never its own message as a frame: the hub
    leaves the sender out of the fan-out, in seq order with everything else)."""
    conn.send({"type": "ack", "id": client_id, "conversation": msg.conversation_id, "seq": msg.seq,
               "ts": msg.created_at, "duplicate": not new})
    metrics.ack_latency.observe(time.perf_counter() - arrived)
