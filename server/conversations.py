"""The hub: this worker's view of the conversations its sockets are in, and the only place that
publishes.

* ``append`` stores a message (durably: it returns after the commit), then publishes it on
  the conversation's topic; the broker delivers it here at once and to the other workers.
* Every stored message a socket gets passes through the conversation's *feed*, which hands
  them out in seq order, each at most once per socket.  A message whose seq skips ahead (one
  stored by another worker, still on its way; or lost in pub/sub) holds the feed while the
  missing ones are read from the database, so no socket ever sees a gap.
* ``subscribe`` puts a socket in a conversation and replays what it missed from the database:
  the broker subscription is in effect first, and the feed holds live messages while the
  replay runs, so a resume has no gap and no duplicate.
* Transient frames (typing, read receipts, state notices) go out as they come; commands for an
  agent's sockets (``a:`` topics) and a team's queue (``t:``) are handed to the agent desk.

The database stays the truth: the cache here (state, agent) follows the event messages, which
are stored and replayed like any other, and is re-read when a conversation is subscribed again.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Callable

from .broker import Broker, agent_topic, conversation_topic, team_topic
from .connections import Connection, Registry
from .errors import NotFound
from .metrics import Metrics
from .storage.base import QUEUED, Conversation, Storage, StorageError, StoredMessage
from .views import message_frame

log = logging.getLogger("kefu.server")

_PAGE = 200
_REPAIR_TRIES = 3

AgentHandler = Callable[[str, dict[str, Any]], None]


class ConvState:
    """What this worker knows of one conversation, and its feed."""

    __slots__ = ("id", "visitor_id", "bot", "state", "agent_id", "last_seq", "meta", "lock", "bot_lock",
                 "listening", "delivered", "held", "busy")

    def __init__(self, conv: Conversation) -> None:
        self.id, self.visitor_id, self.bot = conv.id, conv.visitor_id, conv.bot
        self.state, self.agent_id, self.last_seq = conv.state, conv.agent_id, conv.last_seq
        self.meta = dict(conv.meta)
        self.lock = asyncio.Lock()       # subscribes (and repairs) of this conversation, one at a time
        self.bot_lock = asyncio.Lock()   # one bot turn at a time, in arrival order
        self.listening = False           # subscribed to the broker topic
        self.delivered: int | None = None   # highest seq handed to this worker's sockets (None: none here)
        self.held: dict[int, tuple[dict[str, Any], Connection | None]] = {}  # out-of-order arrivals
        self.busy = 0                    # a replay or repair is reading the database: hold arrivals

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "bot": self.bot, "state": self.state, "agent": self.agent_id,
                "last_seq": self.last_seq}

    def follow(self, conv: Conversation) -> None:
        self.state, self.agent_id = conv.state, conv.agent_id
        self.last_seq = max(self.last_seq, conv.last_seq)


class Conversations:
    def __init__(self, *, storage: Storage, broker: Broker, registry: Registry, metrics: Metrics,
                 resume_max_messages: int, tasks: set[asyncio.Task]) -> None:
        self.storage, self.broker, self.registry, self.metrics = storage, broker, registry, metrics
        self.resume_max = int(resume_max_messages)
        self.tasks = tasks
        self.convs: dict[str, ConvState] = {}
        self._listens: collections.Counter[str] = collections.Counter()
        #: set by the agent desk: commands on ``a:<agent>`` and ``t:<team>`` topics
        self.on_agent_command: AgentHandler | None = None
        self.on_team_command: AgentHandler | None = None
        broker.attach(self._delivered)

    # -- the cache ---------------------------------------------------------------------

    async def get(self, conversation_id: Any) -> ConvState:
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
        """The state of a conversation whose record the caller has just read."""
        c = self.convs.get(conv.id)
        if c is None:
            c = self.convs[conv.id] = ConvState(conv)
        elif not c.listening:
            c.follow(conv)          # nobody here followed its events: the record is newer
        return c

    def release(self, conversation_id: str) -> None:
        """A socket left the conversation: stop listening when it was the last one here, and
        forget the conversation when nothing else uses it."""
        c = self.convs.get(conversation_id)
        if c is None or self.registry.by_conversation.get(conversation_id):
            return
        if c.listening and not c.busy:
            c.listening = False
            c.delivered = None
            c.held.clear()
            self.broker.unsubscribe(conversation_topic(c.id))
        self.forget_if_idle(conversation_id)

    def forget_if_idle(self, conversation_id: str) -> None:
        c = self.convs.get(conversation_id)
        if (c is not None and not c.listening and not c.busy and not c.lock.locked()
                and not c.bot_lock.locked() and not self.registry.by_conversation.get(conversation_id)):
            del self.convs[conversation_id]

    # -- publishing: the only place -------------------------------------------------------

    async def append(self, c: ConvState, *, role: str, sender: str, text: str, kind: str = "text",
                     client_id: str | None = None, meta: dict[str, Any] | None = None,
                     exclude: Connection | None = None) -> tuple[StoredMessage, bool]:
        """Store, then publish (the sender's own socket, ``exclude``, gets an ack instead)."""
        msg, new = await self.storage.append(c.id, role=role, sender_id=sender, text=text, kind=kind,
                                             client_id=client_id, meta=meta)
        if new:
            c.last_seq = max(c.last_seq, msg.seq)
            self.metrics.inc("kefu_messages_stored_total", role=role)
            self.broker.publish(conversation_topic(c.id), message_frame(msg), exclude)
        return msg, new

    async def event(self, c: ConvState, event: str, text: str, **meta: Any) -> None:
        """A state change, stored as a system message (so a resume replays it, and every
        worker's cache follows it) and sent as a transient ``state`` frame."""
        meta = {"event": event, "state": c.state, **meta}
        await self.append(c, role="system", sender="system", text=text, kind="event", meta=meta)
        self.broker.publish(conversation_topic(c.id), {"type": "state", "conversation": c.id, **meta})

    def typing(self, c: ConvState, role: str, sender: str, on: bool, exclude: Connection | None = None) -> None:
        self.broker.publish(conversation_topic(c.id), {"type": "typing", "conversation": c.id, "role": role,
                                                       "sender": sender, "on": on}, exclude)

    def notice(self, c: ConvState, text: str) -> None:
        """A transient notice for the conversation's people (not stored: for when storage
        itself is failing)."""
        self.broker.publish(conversation_topic(c.id), {"type": "notice", "conversation": c.id, "text": text})

    def read(self, c: ConvState, role: str, seq: int, exclude: Connection | None = None) -> None:
        self.broker.publish(conversation_topic(c.id), {"type": "read", "conversation": c.id, "role": role,
                                                       "seq": min(seq, c.last_seq)}, exclude)

    def to_agent(self, agent_id: str, command: dict[str, Any]) -> None:
        """A command for every socket of one agent, on whichever workers they are."""
        self.broker.publish(agent_topic(agent_id), command)

    def to_team(self, team: str, command: dict[str, Any]) -> None:
        self.broker.publish(team_topic(team), command)

    async def listen(self, topic: str) -> None:
        """Follow an agent or team topic while a socket here needs it (counted)."""
        self._listens[topic] += 1
        if self._listens[topic] == 1:
            await self.broker.subscribe(topic)

    def unlisten(self, topic: str) -> None:
        self._listens[topic] -= 1
        if self._listens[topic] <= 0:
            del self._listens[topic]
            self.broker.unsubscribe(topic)

    # -- subscribing ---------------------------------------------------------------------

    async def subscribe(self, conn: Connection, c: ConvState, after_seq: int) -> None:
        """Put ``conn`` in the conversation and send it, in order, every message after
        ``after_seq`` (no gap, no duplicate); more than ``resume_max_messages`` missed: a
        ``resync`` instead."""
        async with c.lock:
            self.convs.setdefault(c.id, c)    # (forgotten while this waited for the lock)
            c.busy += 1
            try:
                if not c.listening:
                    await self.broker.subscribe(conversation_topic(c.id))
                    c.listening = True
                conv = await self.storage.get_conversation(c.id)
                if conv is not None:
                    if c.delivered is None:
                        c.follow(conv)        # nobody here followed it until now
                    c.last_seq = max(c.last_seq, conv.last_seq)
                if c.last_seq - after_seq > self.resume_max:
                    conn.seen[c.id] = last = c.last_seq
                    conn.send({"type": "resync", "conversation": c.id, "last_seq": c.last_seq,
                               "reason": "not_recovered"})
                else:
                    conn.seen[c.id] = max(conn.seen.get(c.id, 0), after_seq)
                    last = await self._replay(conn, c.id, after_seq)
                self.registry.subscribe(conn, c.id)
                if c.delivered is None:
                    c.delivered = last
            finally:
                c.busy -= 1
        self._drain(c)
        self.release(c.id)      # (cancelled before it registered the socket: nobody needs it)

    async def _replay(self, conn: Connection, cid: str, after_seq: int) -> int:
        last = after_seq
        while True:
            page = await self.storage.messages(cid, after_seq=last, limit=_PAGE)
            for msg in page:
                conn.deliver(message_frame(msg))
            if page:
                last = page[-1].seq
            if len(page) < _PAGE:
                return last

    def unsubscribe(self, conn: Connection, conversation_id: str) -> None:
        self.registry.unsubscribe(conn, conversation_id)
        self.release(conversation_id)

    # -- the feed ---------------------------------------------------------------------------

    def _delivered(self, topic: str, payload: dict[str, Any], exclude: Any) -> None:
        """The broker's callback (this worker's publishes and the other workers')."""
        kind, _, key = topic.partition(":")
        if kind == "c":
            c = self.convs.get(key)
            if c is None or not c.listening:
                return
            if payload.get("type") == "message":
                self._arrived(c, payload, exclude)
            else:
                self.registry.to_conversation(c.id, payload, exclude=exclude)
        elif kind == "a" and self.on_agent_command is not None:
            self.on_agent_command(key, payload)
        elif kind == "t" and self.on_team_command is not None:
            self.on_team_command(key, payload)

    def _arrived(self, c: ConvState, frame: dict[str, Any], exclude: Connection | None) -> None:
        seq = frame.get("seq")
        if not isinstance(seq, int):
            return
        if c.busy:
            c.held[seq] = (frame, exclude)
            return
        if c.delivered is None or seq <= c.delivered:
            return
        if seq == c.delivered + 1:
            self._fan_out(c, frame, exclude)
            return
        c.held[seq] = (frame, exclude)      # a gap: the missing ones are in the database
        self._repair(c)

    def _fan_out(self, c: ConvState, frame: dict[str, Any], exclude: Connection | None) -> None:
        seq = frame["seq"]
        c.delivered = seq
        c.last_seq = max(c.last_seq, seq)
        if frame.get("kind") == "event":
            self._follow_event(c, frame.get("meta") or {})
        for conn in self.registry.subscribers(c.id):
            if conn is exclude:   # the sender learnt the seq from its ack; never echo it
                conn.seen[c.id] = max(conn.seen.get(c.id, 0), seq)
            else:
                conn.deliver(frame)

    @staticmethod
    def _follow_event(c: ConvState, meta: dict[str, Any]) -> None:
        state = meta.get("state")
        if not isinstance(state, str):
            return
        c.state = state
        agent = meta.get("agent")
        if isinstance(agent, dict) and isinstance(agent.get("id"), str):
            c.agent_id = agent["id"]
        elif state == QUEUED:
            c.agent_id = None

    def _drain(self, c: ConvState) -> None:
        """Hand out what waited while the feed was held, in order; a gap starts a repair."""
        if c.busy or not c.held:
            return
        if c.delivered is None:
            c.held.clear()
            return
        for seq in sorted(c.held):
            if seq <= c.delivered:
                del c.held[seq]
            elif seq == c.delivered + 1:
                frame, exclude = c.held.pop(seq)
                self._fan_out(c, frame, exclude)
            else:
                self._repair(c)
                return

    def _repair(self, c: ConvState) -> None:
        if c.busy:
            return
        c.busy += 1
        task = asyncio.create_task(self._repairing(c), name=f"kefu-repair-{c.id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _repairing(self, c: ConvState) -> None:
        """Read what the feed missed from the database (it was committed before it was
        published, so it is there), then go on with what arrived meanwhile."""
        try:
            async with c.lock:
                for attempt in range(_REPAIR_TRIES):
                    await self._catch_up(c)
                    if not c.held or min(c.held) <= (c.delivered or 0) + 1:
                        break
                    await asyncio.sleep(0.05 * (attempt + 1))   # a commit not yet visible to readers
                else:
                    gap = (c.delivered, min(c.held))
                    log.warning("conversation %s: seqs after %s missing from storage; going on from %s",
                                c.id, *gap)
                    c.delivered = min(c.held) - 1
        except StorageError as exc:
            log.warning("conversation %s: repair failed (%s); delivering what arrived", c.id, exc)
            if c.held and c.delivered is not None:
                c.delivered = max(c.delivered, min(c.held) - 1)
        except Exception:
            log.exception("conversation %s: repair failed", c.id)
        finally:
            c.busy -= 1
            self.metrics.inc("kefu_feed_repairs_total")
            self._drain(c)
            self.release(c.id)     # its last socket may have left meanwhile

    async def _catch_up(self, c: ConvState) -> None:
        while c.delivered is not None and c.listening:
            page = await self.storage.messages(c.id, after_seq=c.delivered, limit=_PAGE)
            for msg in page:
                if msg.seq <= c.delivered:
                    continue
                frame, exclude = c.held.pop(msg.seq, (None, None))
                self._fan_out(c, frame or message_frame(msg), exclude)
            if len(page) < _PAGE:
                return

    async def recover(self) -> None:
        """After a broker outage: every conversation that moved on while frames could not
        arrive is caught up from the database (one query per 500 conversations, then one per
        conversation that moved)."""
        followed = {cid: c for cid, c in self.convs.items() if c.listening and c.delivered is not None}
        if not followed:
            return
        last = await self.storage.last_seqs(list(followed))
        moved = [c for cid, c in followed.items() if last.get(cid, 0) > (c.delivered or 0)]
        for c in moved:
            self._repair(c)
        log.info("hub: %d of %d conversations caught up after the broker outage", len(moved), len(followed))
