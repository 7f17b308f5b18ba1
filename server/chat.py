"""The chat service: what the WebSocket handlers call.  Visitors, bots, agents, routing events.

Rules kept here (docs/protocol.md is the client-facing description):

* A message is appended to storage (durable) before it is acknowledged; the ack carries
  its seq and echoes the client's id; a client id sent twice is stored once.
* Appends and fan-out of one conversation happen under that conversation's lock, so every
  subscriber gets its messages in seq order; subscribing (and replaying what a client
  missed) takes the same lock, so a resume has no gap and no duplicate.  There is no
  global lock; the bot call and router calls are never made under a conversation lock.
* The sender's identity comes from the connection's session, never from the frame.
* Unknown and foreign conversation ids are indistinguishable (``not_found``).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Awaitable, Callable

from engine import Engine, InputError, KefuError
from websockets.exceptions import ConnectionClosed

from . import protocol as P
from .audit import audit
from .auth import Tokens, check_identity, new_visitor_id
from .connections import Connection, Registry, TimingWheel, WindowCounter
from .errors import NotFound, Unauthorized
from .metrics import Metrics
from .routing import RoutingError
from .storage.base import BOT, CLOSED, HUMAN, QUEUED, Agent, Conversation, Storage, StorageError, StoredMessage
from .storage.detached import run_to_end

log = logging.getLogger("kefu.server")

Handler = Callable[[Connection, dict[str, Any]], Awaitable[None]]


class ConvState:
    """What this process knows of one conversation (the database stays the truth)."""

    __slots__ = ("id", "visitor_id", "bot", "state", "agent_id", "last_seq", "lock", "bot_lock", "meta")

    def __init__(self, conv: Conversation) -> None:
        self.id, self.visitor_id, self.bot = conv.id, conv.visitor_id, conv.bot
        self.state, self.agent_id, self.last_seq = conv.state, conv.agent_id, conv.last_seq
        self.meta = dict(conv.meta)
        self.lock = asyncio.Lock()       # append + fan-out, subscribe + replay
        self.bot_lock = asyncio.Lock()   # one bot turn at a time, in arrival order

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "bot": self.bot, "state": self.state, "agent": self.agent_id,
                "last_seq": self.last_seq}


def agent_dict(agent: Agent) -> dict[str, Any]:
    """An agent's account as clients see it (never the password hash or token version)."""
    return {"id": agent.id, "username": agent.username, "display_name": agent.display_name,
            "capacity": agent.capacity, "team": agent.team}


def conversation_dict(conv: Conversation) -> dict[str, Any]:
    return {"id": conv.id, "visitor": conv.visitor_id, "bot": conv.bot, "state": conv.state,
            "agent": conv.agent_id, "created_at": conv.created_at, "updated_at": conv.updated_at,
            "last_seq": conv.last_seq, "meta": dict(conv.meta)}


def message_frame(msg: StoredMessage) -> dict[str, Any]:
    frame = msg.as_dict()
    frame["type"] = "message"
    return frame


class Chat:
    def __init__(self, settings: dict[str, Any], *, engine: Engine, storage: Storage, router: Any,
                 tokens: Tokens, metrics: Metrics) -> None:
        self.s = settings
        self.engine, self.storage, self.router, self.tokens, self.metrics = engine, storage, router, tokens, metrics
        self.registry = Registry()
        self.convs: dict[str, ConvState] = {}
        self.agent_names: dict[str, str] = {}
        self.agent_teams: dict[str, str] = {}     # agent id -> team (from storage, at hello)
        self.tasks: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()    # set by stop(): bot turns skip their typing delay
        self.new_conv_limit = WindowCounter(int(settings["new_conversations_per_ip_per_min"]))
        self.window_counters: list[WindowCounter] = [self.new_conv_limit]   # swept every second
        self.wheel = TimingWheel(float(settings.get("tick_s", 1.0)), self._check_conn, self._tick)
        self.max_text = int(settings["max_text_chars"])
        self.max_cid = int(settings["max_client_id_chars"])
        self.visitor_handlers: dict[str, Handler] = {
            "hello": self.visitor_hello, "message": self.visitor_message, "typing": self.typing,
            "read": self.read, "handoff": self.visitor_handoff, "close": self.visitor_close,
            "sync": self.sync, "ping": self.ping, "suggest": self.suggest,
        }
        self.agent_handlers: dict[str, Handler] = {
            "hello": self.agent_hello, "message": self.agent_message, "typing": self.typing,
            "read": self.read, "presence": self.presence, "capacity": self.capacity,
            "accept": self.accept, "transfer": self.transfer, "close": self.agent_close,
            "sync": self.sync, "ping": self.ping,
        }
        self._router_ticks = 0.0

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self.wheel.start()

    async def going_away(self, timeout: float = 2.0) -> None:
        """Close every socket with 1001 while the server still runs (before Sanic closes them
        with 1000, "normal closure", which a client may take as final), waiting up to
        ``timeout`` for the close frames to go out."""
        conns = list(self.registry.connections)
        for conn in conns:
            conn.close(P.CLOSE_GOING_AWAY, "server shutting down")
        writers = [conn.writer for conn in conns if not conn.writer.done()]
        if writers:
            await asyncio.wait(writers, timeout=timeout)

    async def stop(self) -> None:
        """Close every socket, then let bot turns in progress store their replies (the visitor
        finds them on resume) for up to ``bot_timeout_s``; what is left is cancelled."""
        await self.wheel.stop()
        self.stopping.set()
        await self.going_away(timeout=0)   # any socket left after the before-stop round
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(self.s["bot_timeout_s"])
        while self.tasks and loop.time() < deadline:   # (a turn may start a handoff meanwhile)
            await asyncio.wait(list(self.tasks), timeout=deadline - loop.time())
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- one connection: the handlers in server/ws.py call this -----------------------

    async def serve(self, ws: Any, kind: str, ip: str) -> None:
        s = self.s
        conn = Connection(ws, kind=kind, ip=ip, binary=getattr(ws, "subprotocol", None) == P.MSGPACK,
                          queue_frames=int(s["send_queue_frames"]), rate_per_s=float(s["rate_per_s"]),
                          rate_burst=float(s["rate_burst"]), on_close=self._closed_by_server)
        handlers = self.visitor_handlers if kind == "visitor" else self.agent_handlers
        self.registry.add(conn)
        self.wheel.schedule(conn, float(s["auth_timeout_s"]))
        self.metrics.inc("kefu_connections_opened_total", kind=kind)
        try:
            while not conn.closed:
                try:
                    data = await ws.recv()
                except (ConnectionClosed, asyncio.CancelledError):
                    break
                if data is None:
                    break
                conn.last_seen = time.monotonic()
                await self.on_frame(conn, data, handlers)
        finally:
            await self.unregister(conn)

    async def unregister(self, conn: Connection) -> None:
        self.wheel.cancel(conn)
        for cid in self.registry.remove(conn):
            self._maybe_forget(cid)
        await conn.finish()
        if conn.agent_id:
            try:
                await self.router.agent_disconnected(conn.agent_id)
            except Exception:
                log.exception("router.agent_disconnected failed")

    def _closed_by_server(self, conn: Connection, code: int) -> None:
        self.metrics.inc("kefu_connections_closed_total", code=str(code))
        self.wheel.cancel(conn)
        for cid in self.registry.remove(conn):   # no more fan-out to it; the handler finishes the rest
            self._maybe_forget(cid)

    async def on_frame(self, conn: Connection, data: str | bytes, handlers: dict[str, Handler]) -> None:
        frame: dict[str, Any] | None = None
        try:
            frame = conn.codec.decode(data)
        except P.FrameError as exc:
            if self._over_rate(conn, 1.0):
                return
            return self._frame_error(conn, exc.code, exc.message, None)
        ftype = frame["type"]
        cost = 0.0 if ftype == "ping" else 0.25 if ftype in ("typing", "suggest") else 1.0
        if self._over_rate(conn, cost):
            return
        client_id = frame.get("id") if isinstance(frame.get("id"), str) else None
        handler = handlers.get(ftype)
        if handler is None:
            return self._frame_error(conn, P.UNKNOWN_TYPE, f"unknown frame type {ftype[:40]!r}", client_id)
        if not conn.authed and ftype != "hello":
            return self._frame_error(conn, P.NOT_HELLO, "send hello first", client_id)
        if conn.authed and ftype == "hello":
            return self._frame_error(conn, P.BAD_STATE, "already said hello", client_id)
        try:
            await handler(conn, frame)
        except P.FrameError as exc:
            self._frame_error(conn, exc.code, exc.message, exc.client_id or client_id)
        except StorageError as exc:
            log.warning("storage failed: %s", exc)
            conn.send(P.error_frame(P.STORAGE, "not stored; retry with the same id", client_id))
        except KefuError as exc:
            self._frame_error(conn, exc.code, exc.message, client_id)
        except Exception:
            log.exception("frame %s from %r failed", ftype, conn)
            conn.send(P.error_frame(P.INTERNAL, "internal error", client_id))

    def _over_rate(self, conn: Connection, cost: float) -> bool:
        if cost == 0 or conn.bucket.take(cost):
            conn.refused = 0
            return False
        conn.refused += 1
        self.metrics.inc("kefu_frames_rejected_total", code=P.RATE_LIMITED)
        if conn.refused == 1:
            conn.send(P.error_frame(P.RATE_LIMITED, "too many frames; slow down"))
        elif conn.refused >= 5:
            conn.close(P.CLOSE_RATE_LIMITED, "rate limit")
        return True

    def _frame_error(self, conn: Connection, code: str, message: str, client_id: str | None) -> None:
        conn.errors += 1
        self.metrics.inc("kefu_frames_rejected_total", code=code)
        conn.send(P.error_frame(code, message, client_id))
        if conn.errors >= int(self.s["max_errors"]):
            conn.close(P.CLOSE_TOO_MANY_ERRORS, "too many errors")

    def _refuse(self, conn: Connection, code: str, message: str, close_code: int) -> None:
        self.metrics.inc("kefu_frames_rejected_total", code=code)
        conn.send(P.error_frame(code, message))
        conn.close(close_code, message[:100])

    # -- timing wheel: heartbeats, idle and auth deadlines; the router's tick ----------

    def _check_conn(self, conn: Connection, now: float) -> float | None:
        if conn.closed:
            return None
        if not conn.authed:
            if now - conn.opened >= float(self.s["auth_timeout_s"]):
                self._refuse(conn, P.UNAUTHORIZED, "no hello in time", P.CLOSE_UNAUTHORIZED)
                return None
            return float(self.s["auth_timeout_s"]) - (now - conn.opened)
        beat, timeout = float(self.s["heartbeat_s"]), float(self.s["heartbeat_timeout_s"])
        silent = now - conn.last_seen
        if conn.ping_sent is not None and now - conn.ping_sent >= timeout and silent >= beat + timeout - 1e-6:
            conn.abort(P.CLOSE_IDLE, "heartbeat timeout")
            return None
        if silent >= beat:
            if conn.ping_sent is None:
                conn.ping()
            return timeout
        return beat - silent

    async def _tick(self, now: float) -> None:
        self._router_ticks += self.wheel.tick_s
        if self._router_ticks >= 1.0:
            self._router_ticks = 0.0
            for counter in self.window_counters:
                counter.sweep()
            await self.router.tick()

    # -- conversations ------------------------------------------------------------------

    async def conversation(self, conversation_id: Any) -> ConvState:
        if not isinstance(conversation_id, str) or not conversation_id or len(conversation_id) > 64:
            raise NotFound("no such conversation")
        c = self.convs.get(conversation_id)
        if c is None:
            conv = await self.storage.get_conversation(conversation_id)
            if conv is None:
                raise NotFound("no such conversation")
            c = self.state_of(conv)
        return c

    def state_of(self, conv: Conversation) -> ConvState:
        """The state of a conversation whose record the caller already read."""
        return self.convs.setdefault(conv.id, ConvState(conv))

    def _maybe_forget(self, cid: str) -> None:
        c = self.convs.get(cid)
        if c and not self.registry.by_conversation.get(cid) and not c.lock.locked() and not c.bot_lock.locked():
            del self.convs[cid]

    async def append(self, c: ConvState, *, role: str, sender: str, text: str, kind: str = "text",
                     client_id: str | None = None, meta: dict[str, Any] | None = None,
                     exclude: Connection | None = None) -> tuple[StoredMessage, bool]:
        async with c.lock:
            msg, new = await self.storage.append(c.id, role=role, sender_id=sender, text=text, kind=kind,
                                                 client_id=client_id, meta=meta)
            if new:
                c.last_seq = max(c.last_seq, msg.seq)
                self.metrics.inc("kefu_messages_stored_total", role=role)
                self.registry.to_conversation(c.id, message_frame(msg), exclude=exclude, message=True)
        return msg, new

    async def subscribe(self, conn: Connection, c: ConvState, after_seq: int) -> None:
        """Subscribe and send, in order, every message after ``after_seq`` (no gap, no duplicate)."""
        limit = int(self.s["resume_max_messages"])
        async with c.lock:
            # forgotten while we waited for the lock (its last subscriber left meanwhile): keep it
            self.convs.setdefault(c.id, c)
            self.registry.subscribe(conn, c.id)
            if c.last_seq - after_seq > limit:
                conn.seen[c.id] = c.last_seq
                conn.send({"type": "resync", "conversation": c.id, "last_seq": c.last_seq,
                           "reason": "not_recovered"})
                return
            conn.seen[c.id] = max(conn.seen.get(c.id, 0), after_seq)
            while True:
                page = await self.storage.messages(c.id, after_seq=after_seq, limit=200)
                for msg in page:
                    conn.deliver(message_frame(msg))
                if len(page) < 200:
                    break
                after_seq = page[-1].seq

    async def event(self, c: ConvState, event: str, text: str, **meta: Any) -> None:
        """A state change, stored as a system message (so a resume replays it) and sent as a
        transient ``state`` frame to every subscriber."""
        meta = {"event": event, "state": c.state, **meta}
        await self.append(c, role="system", sender="system", text=text, kind="event", meta=meta)
        self.registry.to_conversation(c.id, {"type": "state", "conversation": c.id, **meta})

    # -- visitors -------------------------------------------------------------------------

    async def visitor_hello(self, conn: Connection, frame: dict[str, Any]) -> None:
        identity, token = frame.get("identity"), frame.get("token")
        verified = None
        try:
            if identity is not None:
                verified = check_identity(str(self.s["identity_secret"]), identity,
                                          max_age_s=float(self.s["identity_max_age_s"]))
                visitor_id = self.tokens.verified_visitor_id(verified)
            elif token is not None:
                visitor_id, verified = self.tokens.open_visitor(token)
            else:
                visitor_id = new_visitor_id()
        except Unauthorized as exc:
            return self._refuse(conn, P.UNAUTHORIZED, exc.message, P.CLOSE_UNAUTHORIZED)
        wanted = P.get_str(frame, "conversation", required=False, max_len=64)
        last_seq = P.get_int(frame, "last_seq", required=False, default=0)
        start_new = P.get_bool(frame, "new", False)
        bot = P.get_str(frame, "bot", required=False, max_len=64)
        c: ConvState | None = None
        if wanted:
            try:
                c = await self.conversation(wanted)
            except NotFound:
                c = None
            if c is None or c.visitor_id != visitor_id:
                return self._refuse(conn, P.NOT_FOUND, "no such conversation", P.CLOSE_NOT_FOUND)
        elif not start_new and (token is not None or identity is not None):
            recent = await self.storage.list_conversations(visitor_id=visitor_id, limit=1)
            if recent and recent[0].state != CLOSED and (bot is None or recent[0].bot == bot):
                c = self.state_of(recent[0])
        created = False
        if c is None:
            bot = bot or self.default_bot()
            if bot not in self.engine.bots:
                return self._refuse(conn, P.NOT_FOUND, f"unknown bot {bot!r}", P.CLOSE_NOT_FOUND)
            if not self.new_conv_limit.hit(conn.ip):
                return self._refuse(conn, P.RATE_LIMITED, "too many new conversations from this address",
                                    P.CLOSE_RATE_LIMITED)
            meta = {"verified_id": verified} if verified else {}
            conv = await self.storage.create_conversation(visitor_id, bot, meta=meta)
            c = self.convs.setdefault(conv.id, ConvState(conv))
            created = True
        conn.visitor_id = visitor_id
        self.registry.identify(conn)
        self.wheel.schedule(conn, float(self.s["heartbeat_s"]))
        conn.send({"type": "welcome", "visitor": visitor_id, "verified": bool(verified),
                   "token": self.tokens.visitor_token(visitor_id, verified=verified),
                   "conversation": c.summary(), "agent_name": self.agent_names.get(c.agent_id or ""),
                   "features": ["suggest"]})
        if created:
            greeting = self.engine.greeting(c.bot)
            if greeting:
                await self.append(c, role="bot", sender=c.bot, text=greeting, kind="greeting")
        await self.subscribe(conn, c, last_seq or 0)

    def default_bot(self) -> str:
        return str(self.s["default_bot"] or next(iter(self.engine.bots), ""))

    def _visitor_conv(self, conn: Connection) -> ConvState:
        for cid in conn.conversations:
            c = self.convs.get(cid)
            if c is not None:
                return c
        raise NotFound("no conversation on this connection")

    async def visitor_message(self, conn: Connection, frame: dict[str, Any]) -> None:
        arrived = time.perf_counter()
        client_id = P.get_str(frame, "id", max_len=self.max_cid)
        text = P.get_text(frame, self.max_text)
        c = self._visitor_conv(conn)
        if c.state == CLOSED:
            raise P.FrameError(P.BAD_STATE, "the conversation is closed; start a new one", client_id)
        msg, new = await self.append(c, role="visitor", sender=conn.visitor_id or "", text=text,
                                     client_id=client_id, exclude=conn)
        self._ack(conn, msg, client_id, new, arrived)
        if new and c.state == BOT:
            self.spawn(self._bot_turn(c, text), f"kefu-bot-{c.id}")

    def _ack(self, conn: Connection, msg: StoredMessage, client_id: str, new: bool, arrived: float) -> None:
        conn.seen[msg.conversation_id] = max(conn.seen.get(msg.conversation_id, 0), msg.seq)
        conn.send({"type": "ack", "id": client_id, "conversation": msg.conversation_id, "seq": msg.seq,
                   "ts": msg.created_at, "duplicate": not new})
        self.metrics.ack_latency.observe(time.perf_counter() - arrived)

    async def _bot_turn(self, c: ConvState, text: str) -> None:
        try:
            await self._answer(c, text)
        finally:
            self._maybe_forget(c.id)   # its last subscriber may have left during the turn

    async def _answer(self, c: ConvState, text: str) -> None:
        async with c.bot_lock:
            if c.state != BOT:
                return
            self._typing_frame(c, "bot", c.bot, True)
            try:
                turn = await asyncio.wait_for(self.engine.handle(c.bot, text, session=c.id),
                                              float(self.s["bot_timeout_s"]))
            except asyncio.TimeoutError:
                self.metrics.inc("kefu_bot_turns_total", outcome="timeout")
                self._typing_frame(c, "bot", c.bot, False)
                log.warning("bot %s did not answer within %ss; handing off %s", c.bot, self.s["bot_timeout_s"], c.id)
                await self.handoff(c, "bot_timeout")
                return
            except InputError:
                self._typing_frame(c, "bot", c.bot, False)
                return
            except Exception:
                self.metrics.inc("kefu_bot_turns_total", outcome="error")
                self._typing_frame(c, "bot", c.bot, False)
                log.exception("bot %s failed; handing off %s", c.bot, c.id)
                await self.handoff(c, "bot_error")
                return
            if turn.delay_s > 0:
                # The typing delay, cut short by stop(): a reply is worth more than the pause.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(turn.delay_s):
                        await self.stopping.wait()
            self._typing_frame(c, "bot", c.bot, False)
            if c.state != BOT:   # the visitor asked for a person meanwhile
                return
            self.metrics.inc("kefu_bot_turns_total", outcome="handoff" if turn.handoff else "answered")
            meta = {"intent": turn.intent, "confidence": round(float(turn.confidence), 4), "source": turn.source}
            for reply in turn.replies:
                kind = reply.kind if reply.kind in ("text", "handoff", "greeting") else "text"
                await self.append(c, role="bot", sender=c.bot, text=reply.text, kind=kind, meta=meta)
        if turn.handoff:
            await self.handoff(c, turn.handoff.reason)

    async def handoff(self, c: ConvState, reason: str) -> None:
        """Bot -> a person: a state change.  The bot stops answering at once.  It runs to its
        end even when the visitor's socket closes meanwhile (the handler is cancelled then):
        stopped half-way, the conversation would stay queued here and ``bot`` in storage,
        where no agent would ever see it."""
        await run_to_end(self._handoff(c, reason), self.tasks, orphan_failure=lambda exc: log.error(
            "handoff of %s failed after the visitor went away", c.id, exc_info=exc))

    async def _handoff(self, c: ConvState, reason: str) -> None:
        if c.state != BOT:
            return
        c.state = QUEUED   # provisional: stops the bot; the router's answer sets the real state
        result = await self.router.request_human(c.id)
        kind = type(result).__name__
        self.metrics.inc("kefu_handoffs_total", outcome=kind.lower())
        if kind == "Assigned":
            return   # the router notified us (on_route) before returning
        if kind == "Queued":
            c.state, c.agent_id = QUEUED, None
            await self.event(c, "queued", "Connecting you to a person. You are number "
                             f"{result.position} in the queue.", position=result.position, reason=reason)
            await self._tell_agents_queue()
            return
        # Unavailable: keep it queued in storage so agents see it (and get it offered) later.
        conv = await self.storage.transition(c.id, to_state=QUEUED, agent_id=None, from_states=(BOT, QUEUED))
        c.state, c.agent_id = (conv.state, conv.agent_id) if conv else (QUEUED, None)
        text = ("Nobody is available right now (outside business hours). " if result.reason == "outside_business_hours"
                else "No agent is online right now. ")
        await self.event(c, "unavailable", text + "Leave a message and we will get back to you.",
                         reason=result.reason, available=False)
        await self._tell_agents_queue()

    async def visitor_handoff(self, conn: Connection, frame: dict[str, Any]) -> None:
        c = self._visitor_conv(conn)
        if c.state == BOT:
            await self.handoff(c, "asked")
        else:
            conn.send({"type": "state", "conversation": c.id, "event": "unchanged", "state": c.state})

    async def visitor_close(self, conn: Connection, frame: dict[str, Any]) -> None:
        c = self._visitor_conv(conn)
        await self._close(c, agent_id=None, by="visitor")

    # -- typing, read receipts, sync, ping (both kinds) --------------------------------

    def _conv_for(self, conn: Connection, frame: dict[str, Any]) -> ConvState:
        if conn.kind == "visitor":
            return self._visitor_conv(conn)
        cid = P.get_str(frame, "conversation", max_len=64)
        c = self.convs.get(cid or "")
        if c is None or cid not in conn.conversations or c.agent_id != conn.agent_id:
            raise NotFound("no such conversation")
        return c

    def _typing_frame(self, c: ConvState, role: str, sender: str, on: bool, exclude: Connection | None = None) -> None:
        self.registry.to_conversation(c.id, {"type": "typing", "conversation": c.id, "role": role,
                                             "sender": sender, "on": on}, exclude=exclude)

    async def typing(self, conn: Connection, frame: dict[str, Any]) -> None:
        c = self._conv_for(conn, frame)
        on = P.get_bool(frame, "on", True)
        self._typing_frame(c, conn.kind, conn.agent_id or conn.visitor_id or "", on, exclude=conn)

    async def read(self, conn: Connection, frame: dict[str, Any]) -> None:
        c = self._conv_for(conn, frame)
        seq = P.get_int(frame, "seq")
        self.registry.to_conversation(c.id, {"type": "read", "conversation": c.id, "role": conn.kind,
                                             "seq": min(seq, c.last_seq)}, exclude=conn)

    async def sync(self, conn: Connection, frame: dict[str, Any]) -> None:
        c = self._conv_for(conn, frame)
        last_seq = P.get_int(frame, "last_seq", required=False, default=0) or 0
        conn.seen[c.id] = min(conn.seen.get(c.id, 0), last_seq)
        await self.subscribe(conn, c, last_seq)

    async def suggest(self, conn: Connection, frame: dict[str, Any]) -> None:
        """Type-ahead: FAQ questions and examples starting like the visitor's text."""
        c = self._visitor_conv(conn)
        prefix = P.get_str(frame, "prefix", max_len=100) or ""
        limit = P.get_int(frame, "limit", required=False, default=5, minimum=1, maximum=10) or 5
        items = self.engine.suggest(c.bot, prefix, limit) if prefix.strip() else []
        conn.send({"type": "suggestions", "conversation": c.id, "prefix": prefix, "items": list(items)})

    async def ping(self, conn: Connection, frame: dict[str, Any]) -> None:
        conn.send({"type": "pong"})

    # -- agents ----------------------------------------------------------------------------

    async def agent_hello(self, conn: Connection, frame: dict[str, Any]) -> None:
        try:
            agent_id, version = self.tokens.open_agent(frame.get("token"))
        except Unauthorized as exc:
            return self._refuse(conn, P.UNAUTHORIZED, exc.message, P.CLOSE_UNAUTHORIZED)
        agent = await self.storage.get_agent(agent_id=agent_id)
        if agent is None or agent.token_version != version:
            return self._refuse(conn, P.UNAUTHORIZED, "token revoked", P.CLOSE_REVOKED)
        conn.agent_id, conn.token_version = agent.id, agent.token_version
        self.agent_names[agent.id] = agent.display_name or agent.username
        self.agent_teams[agent.id] = agent.team
        self.registry.identify(conn)
        self.wheel.schedule(conn, float(self.s["heartbeat_s"]))
        mine = await self.storage.list_conversations(agent_id=agent.id, state=HUMAN, limit=500)
        resume = frame.get("resume") if isinstance(frame.get("resume"), dict) else {}
        conn.send({"type": "welcome", "agent": agent_dict(agent),
                   "conversations": [conversation_dict(conv) for conv in mine],
                   "queue": list(self.router.queue(agent.team))})
        await self.router.agent_connected(agent.id, agent.capacity, agent.team)
        for conv in mine:
            c = self.state_of(conv)
            seq = resume.get(conv.id, 0)
            await self.subscribe(conn, c, seq if isinstance(seq, int) and not isinstance(seq, bool) else 0)
        await self._offer_offline()

    async def _offer_offline(self) -> None:
        """Conversations left while nobody was online wait in storage as queued: route them now."""
        queued = set(self.router.queue())
        for conv in await self.storage.list_conversations(state=QUEUED, limit=500):
            if conv.id not in queued:
                try:
                    await self.router.request_human(conv.id)
                except Exception:
                    log.exception("routing offline conversation %s failed", conv.id)

    async def agent_message(self, conn: Connection, frame: dict[str, Any]) -> None:
        arrived = time.perf_counter()
        client_id = P.get_str(frame, "id", max_len=self.max_cid)
        text = P.get_text(frame, self.max_text)
        c = self._conv_for(conn, frame)
        if c.state != HUMAN:
            raise P.FrameError(P.BAD_STATE, f"the conversation is {c.state}", client_id)
        msg, new = await self.append(c, role="agent", sender=conn.agent_id or "", text=text,
                                     client_id=client_id, exclude=conn, meta={"name": self.agent_names.get(conn.agent_id or "", "")})
        self._ack(conn, msg, client_id, new, arrived)

    async def presence(self, conn: Connection, frame: dict[str, Any]) -> None:
        status = P.get_str(frame, "status", max_len=10)
        if status not in ("online", "away"):
            raise P.FrameError(P.BAD_FIELD, "status must be online or away")
        await self._route_call(self.router.set_presence(conn.agent_id, status))
        self.registry.to_agent(conn.agent_id or "", {"type": "presence", "status": status})

    async def capacity(self, conn: Connection, frame: dict[str, Any]) -> None:
        value = P.get_int(frame, "value", maximum=1000)
        await self._route_call(self.router.set_capacity(conn.agent_id, value))
        await self.storage.update_agent(conn.agent_id or "", capacity=value)
        self.registry.to_agent(conn.agent_id or "", {"type": "capacity", "value": value})

    def team_of(self, c: ConvState) -> str:
        return self.router.team_of_bot(c.bot)

    async def accept(self, conn: Connection, frame: dict[str, Any]) -> None:
        cid = P.get_str(frame, "conversation", max_len=64)
        c = await self.conversation(cid)
        if c.state != QUEUED:
            raise NotFound("no such queued conversation")
        # The router refuses another team's conversation (``forbidden``); audited here.
        await self._audited_route("accept", conn, c, self.router.accept(c.id, conn.agent_id),
                                  agent_team=self.agent_teams.get(conn.agent_id or "", "default"),
                                  conversation_team=self.team_of(c))

    async def transfer(self, conn: Connection, frame: dict[str, Any]) -> None:
        c = self._conv_for(conn, frame)
        target = P.get_str(frame, "to", max_len=64)
        agent = await self.storage.get_agent(agent_id=target)
        if agent is None:
            raise NotFound("no such agent")
        detail = {"to": agent.id, "to_team": agent.team, "conversation_team": self.team_of(c)}
        if agent.team != self.team_of(c):
            # The router knows only connected agents' teams; the stored team covers the rest.
            audit(self.metrics, "transfer", agent=conn.agent_id or "", conversation=c.id, **detail)
            raise P.FrameError(P.FORBIDDEN, "the conversation is not in your team")
        await self._audited_route("transfer", conn, c, self.router.transfer(c.id, conn.agent_id, target), **detail)

    async def _audited_route(self, action: str, conn: Connection, c: ConvState, coro: Awaitable[Any],
                             **detail: Any) -> Any:
        """A routing call whose ``forbidden`` refusal (another team) is audited before it reaches
        the agent as an error frame."""
        try:
            return await self._route_call(coro)
        except P.FrameError as exc:
            if exc.code == P.FORBIDDEN:
                audit(self.metrics, action, agent=conn.agent_id or "", conversation=c.id, **detail)
            raise

    async def agent_close(self, conn: Connection, frame: dict[str, Any]) -> None:
        c = self._conv_for(conn, frame)
        await self._close(c, agent_id=conn.agent_id, by="agent")

    async def _close(self, c: ConvState, agent_id: str | None, by: str) -> None:
        if c.state == CLOSED:
            return
        previous = c.agent_id
        conv = await self._route_call(self.router.close(c.id, agent_id))
        c.state, c.agent_id = CLOSED, conv.agent_id if conv else None
        await self.event(c, "closed", "The conversation was closed.", by=by)
        if previous:
            for ac in self.registry.agent_conns(previous):
                self.registry.unsubscribe(ac, c.id)
                ac.send({"type": "unassigned", "conversation": c.id, "reason": "closed"})

    async def _route_call(self, coro: Awaitable[Any]) -> Any:
        try:
            return await coro
        except RoutingError as exc:
            code = "not_found" if exc.code in ("not_found", "not_owner") else exc.code
            raise P.FrameError(code, str(exc)) from None

    async def _tell_agents_queue(self) -> None:
        """Each agent gets the queue of their own team only."""
        frames: dict[str, dict[str, Any]] = {}
        for agent_id in list(self.registry.by_agent):
            team = self.agent_teams.get(agent_id, "default")
            if team not in frames:
                frames[team] = {"type": "queue", "conversations": list(self.router.queue(team))}
            self.registry.to_agent(agent_id, frames[team])

    # -- routing events (the router's notify callback) -----------------------------------

    async def on_route(self, event: Any) -> None:
        kind = type(event).__name__
        c = await self.conversation(event.conversation_id)
        if kind == "Assigned":
            previous = event.previous_agent
            c.state, c.agent_id = HUMAN, event.agent_id
            name = self.agent_names.get(event.agent_id)
            if name is None:
                agent = await self.storage.get_agent(agent_id=event.agent_id)
                name = self.agent_names[event.agent_id] = (agent.display_name or agent.username) if agent else "an agent"
            if previous:
                for ac in self.registry.agent_conns(previous):
                    self.registry.unsubscribe(ac, c.id)
                    ac.send({"type": "unassigned", "conversation": c.id, "reason": "transferred",
                             "to": event.agent_id})
            sockets = self.registry.agent_conns(event.agent_id)
            if sockets:
                conv = await self.storage.get_conversation(c.id)
                assigned = {"type": "assigned", "conversation": conversation_dict(conv) if conv else c.summary(),
                            "previous_agent": previous}
            for ac in sockets:
                ac.send(assigned)
                ac.seen.pop(c.id, None)
                await self.subscribe(ac, c, 0)   # the whole transcript, bot turns included
            text = (f"You have been transferred to {name}." if previous else f"You are now chatting with {name}.")
            await self.event(c, "transferred" if previous else "assigned", text,
                             agent={"id": event.agent_id, "name": name})
            await self._tell_agents_queue()
        elif kind == "Queued":
            previous = getattr(event, "previous_agent", None)
            c.state, c.agent_id = QUEUED, None
            for ac in self.registry.agent_conns(previous or ""):
                self.registry.unsubscribe(ac, c.id)
            await self.event(c, "queued", f"Your agent left. You are number {event.position} in the queue.",
                             position=event.position, reason="agent_left")
            await self._tell_agents_queue()
        elif kind == "Unavailable":
            await self.event(c, "unavailable", "No agent is available right now. Leave a message.",
                             reason=event.reason, available=False)

    # -- agents' accounts (REST) -------------------------------------------------------------

    def revoke(self, agent_id: str) -> None:
        """The agent's password changed: close every live socket of theirs (4002)."""
        for conn in self.registry.agent_conns(agent_id):
            conn.send(P.error_frame(P.UNAUTHORIZED, "token revoked"))
            conn.close(P.CLOSE_REVOKED, "token revoked")
