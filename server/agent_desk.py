"""The agent's side: agent frames (hello, messages, presence, capacity, accept, transfer,
close), routing's events, and the commands that reach an agent's sockets on every worker.

Routing runs on whichever worker an action happened; its events (:class:`Assigned`,
:class:`Queued`, :class:`Unavailable`, matched by type) are turned here into a stored event
message for the visitor (every worker's hub follows it) and a command on the agent's topic
(``assigned``, ``unassigned``, ``send``, ``revoke``), which the workers holding that agent's
sockets carry out, one command at a time per agent, in order.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from engine import Engine

from . import protocol as P
from .audit import audit
from .auth import Tokens
from .broker import agent_topic, team_topic
from .config import Settings
from .connections import Connection, Registry
from .conversations import ConvState, Conversations
from .errors import NotFound, Unauthorized
from .metrics import Metrics
from .routing import Assigned, Queued, Router, RoutingError, Unavailable
from .routing.state import DEFAULT_TEAM, ONLINE
from .storage.base import CLOSED, HUMAN, QUEUED, Storage
from .views import agent_dict, conversation_dict
from .visitor_desk import ack

if TYPE_CHECKING:
    from .sessions import Sessions

log = logging.getLogger("kefu.server")


class _PerAgent:
    """Runs each agent's commands one at a time, in the order they came (no task while idle)."""

    def __init__(self, tasks: set[asyncio.Task]) -> None:
        self._queues: dict[str, collections.deque[Callable[[], Awaitable[None]]]] = {}
        self._tasks = tasks

    def run(self, agent_id: str, job: Callable[[], Awaitable[None]]) -> None:
        queue = self._queues.get(agent_id)
        if queue is not None:
            queue.append(job)
            return
        self._queues[agent_id] = collections.deque([job])
        task = asyncio.create_task(self._drain(agent_id), name=f"kefu-agent-{agent_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, agent_id: str) -> None:
        queue = self._queues[agent_id]
        try:
            while queue:
                job = queue.popleft()
                try:
                    await job()
                except Exception:
                    log.exception("agent %s: command failed", agent_id)
        finally:
            del self._queues[agent_id]


class AgentDesk:
    def __init__(self, settings: Settings, *, engine: Engine, hub: Conversations, storage: Storage,
                 router: Router, tokens: Tokens, registry: Registry, metrics: Metrics) -> None:
        self.s, self.engine, self.hub, self.storage, self.router, self.tokens, self.registry, self.metrics = (
            settings, engine, hub, storage, router, tokens, registry, metrics)
        self.sessions: Sessions          # set at wiring
        self.names: dict[str, str] = {}
        # what this worker last told routing of each agent it held (re-announced after an outage)
        self.profiles: dict[str, tuple[int, str, str]] = {}    # agent -> (capacity, team, status)
        self.tasks: set[asyncio.Task] = set()
        self._serial = _PerAgent(self.tasks)
        self._joining: set[tuple[int, str]] = set()     # (socket, conversation) being subscribed
        self.handlers = {"hello": self.hello, "message": self.message, "presence": self.presence,
                         "capacity": self.capacity, "accept": self.accept, "transfer": self.transfer,
                         "close": self.close}
        hub.on_agent_command = self.on_agent_command
        hub.on_team_command = self.on_team_command

    # -- sockets -------------------------------------------------------------------------

    def conversation_of(self, conn: Connection, frame: dict[str, Any]) -> ConvState:
        cid = P.get_str(frame, "conversation", max_len=64)
        c = self.hub.convs.get(cid or "")
        if (c is None or c.agent_id != conn.agent_id
                or (cid not in conn.conversations and (id(conn), cid) not in self._joining)):
            raise NotFound("no such conversation")
        return c

    async def hello(self, conn: Connection, frame: dict[str, Any]) -> None:
        try:
            agent_id, version, expires = self.tokens.open_agent_claims(frame.get("token"))
        except Unauthorized as exc:
            return self.sessions.refuse(conn, P.UNAUTHORIZED, exc.message, P.CLOSE_UNAUTHORIZED)
        agent = await self.storage.get_agent(agent_id=agent_id)
        if agent is None or agent.token_version != version:
            return self.sessions.refuse(conn, P.UNAUTHORIZED, "token revoked", P.CLOSE_REVOKED)
        conn.agent_id, conn.token_version, conn.team = agent.id, agent.token_version, agent.team
        conn.token_expires = expires
        self.names[agent.id] = agent.display_name or agent.username
        self.sessions.authenticated(conn)
        for topic in (agent_topic(agent.id), team_topic(agent.team)):
            conn.topics.append(topic)
            await self.hub.listen(topic)
        mine = await self.storage.list_conversations(agent_id=agent.id, state=HUMAN, limit=500)
        resume = frame.get("resume") if isinstance(frame.get("resume"), dict) else {}
        conn.send({"type": "welcome", "agent": agent_dict(agent),
                   "conversations": [conversation_dict(conv) for conv in mine],
                   "queue": await self.router.queue(agent.team), "node": self.sessions.node})
        status = self.profiles.get(agent.id, (0, "", ONLINE))[2]
        self.profiles[agent.id] = (agent.capacity, agent.team, status)
        await self.router.agent_connected(agent.id, agent.capacity, agent.team)
        conn.routed = True
        for conv in mine:
            seq = resume.get(conv.id, 0)
            await self.hub.subscribe(conn, self.hub.state_of(conv),
                                     seq if isinstance(seq, int) and not isinstance(seq, bool) else 0)
        await self._offer_offline()

    async def disconnected(self, conn: Connection) -> None:
        for topic in conn.topics:
            self.hub.unlisten(topic)
        conn.topics.clear()
        if conn.routed and conn.agent_id:
            conn.routed = False
            await self.router.agent_disconnected(conn.agent_id)

    async def _offer_offline(self) -> None:
        """Conversations left while nobody was online wait in storage as queued: route them now."""
        queued = set(await self.router.queue())
        for conv in await self.storage.list_conversations(state=QUEUED, limit=500):
            if conv.id not in queued:
                try:
                    await self.router.request_human(conv.id)
                except Exception:
                    log.exception("routing offline conversation %s failed", conv.id)

    async def name_of(self, agent_id: str | None) -> str | None:
        if not agent_id:
            return None
        name = self.names.get(agent_id)
        if name is None:
            agent = await self.storage.get_agent(agent_id=agent_id)
            if agent is None:
                return None
            name = self.names[agent_id] = agent.display_name or agent.username
        return name

    # -- agent frames ---------------------------------------------------------------------

    async def message(self, conn: Connection, frame: dict[str, Any]) -> None:
        arrived = time.perf_counter()
        client_id = P.get_str(frame, "id", max_len=self.s.max_client_id_chars)
        text = P.get_text(frame, self.s.max_text_chars)
        c = self.conversation_of(conn, frame)
        if c.state != HUMAN:
            raise P.FrameError(P.BAD_STATE, f"the conversation is {c.state}", client_id)
        msg, new = await self.hub.append(c, role="agent", sender=conn.agent_id or "", text=text,
                                         client_id=client_id, exclude=conn,
                                         meta={"name": self.names.get(conn.agent_id or "", "")})
        ack(conn, msg, client_id, new, arrived, self.metrics)

    async def presence(self, conn: Connection, frame: dict[str, Any]) -> None:
        status = P.get_str(frame, "status", max_len=10)
        if status not in ("online", "away"):
            raise P.FrameError(P.BAD_FIELD, "status must be online or away")
        agent_id = conn.agent_id or ""
        await route_call(self.router.set_presence(agent_id, status))
        capacity, team, _ = self.profiles.get(agent_id, (0, conn.team or DEFAULT_TEAM, status))
        self.profiles[agent_id] = (capacity, team, status)
        self.hub.to_agent(agent_id, {"do": "send", "frame": {"type": "presence", "status": status}})

    async def capacity(self, conn: Connection, frame: dict[str, Any]) -> None:
        value = P.get_int(frame, "value", maximum=1000)
        agent_id = conn.agent_id or ""
        await route_call(self.router.set_capacity(agent_id, value))
        await self.storage.update_agent(agent_id, capacity=value)
        _, team, status = self.profiles.get(agent_id, (0, conn.team or DEFAULT_TEAM, ONLINE))
        self.profiles[agent_id] = (value, team, status)
        self.hub.to_agent(agent_id, {"do": "send", "frame": {"type": "capacity", "value": value}})

    async def accept(self, conn: Connection, frame: dict[str, Any]) -> None:
        c = await self.hub.get(P.get_str(frame, "conversation", max_len=64))
        if c.state != QUEUED:
            raise NotFound("no such queued conversation")
        # The router refuses another team's conversation (``forbidden``); audited here.
        await self._audited("accept", conn, c, self.router.accept(c.id, conn.agent_id or ""),
                            agent_team=conn.team or DEFAULT_TEAM, conversation_team=self.router.team_of_bot(c.bot))

    async def transfer(self, conn: Connection, frame: dict[str, Any]) -> None:
        c = self.conversation_of(conn, frame)
        target = P.get_str(frame, "to", max_len=64)
        agent = await self.storage.get_agent(agent_id=target)
        if agent is None:
            raise NotFound("no such agent")
        team = self.router.team_of_bot(c.bot)
        detail = {"to": agent.id, "to_team": agent.team, "conversation_team": team}
        if agent.team != team:
            # The router knows only connected agents' teams; the stored team covers the rest.
            audit(self.metrics, "transfer", agent=conn.agent_id or "", conversation=c.id, **detail)
            raise P.FrameError(P.FORBIDDEN, "the conversation is not in your team")
        await self._audited("transfer", conn, c, self.router.transfer(c.id, conn.agent_id or "", agent.id), **detail)

    async def _audited(self, action: str, conn: Connection, c: ConvState, call: Awaitable[Any], **detail: Any) -> Any:
        """A routing call whose ``forbidden`` refusal (another team) is audited before it reaches
        the agent as an error frame."""
        try:
            return await route_call(call)
        except P.FrameError as exc:
            if exc.code == P.FORBIDDEN:
                audit(self.metrics, action, agent=conn.agent_id or "", conversation=c.id, **detail)
            raise

    async def close(self, conn: Connection, frame: dict[str, Any]) -> None:
        await self.close_conversation(self.conversation_of(conn, frame), agent_id=conn.agent_id, by="agent")

    async def close_conversation(self, c: ConvState, *, agent_id: str | None, by: str) -> None:
        """Closed by the visitor (``agent_id`` None) or by its agent."""
        if c.state == CLOSED:
            return
        previous = c.agent_id
        conv = await route_call(self.router.close(c.id, agent_id))
        c.state, c.agent_id = CLOSED, conv.agent_id if conv else None
        await self.hub.event(c, "closed", self.engine.text(c.bot, "closed"), by=by)
        if previous:
            self.hub.to_agent(previous, {"do": "unassigned", "conversation": c.id, "reason": "closed"})

    # -- routing's events (the router's notify callback, on the worker that routed) ------------

    async def on_route(self, event: Assigned | Queued | Unavailable) -> None:
        c = await self.hub.get(event.conversation_id)
        try:
            match event:
                case Assigned(agent_id=agent_id, previous_agent=previous):
                    await self._assigned(c, agent_id, previous, transfer=event.transfer)
                case Queued(position=position, previous_agent=previous):
                    c.state, c.agent_id = QUEUED, None
                    if previous:
                        self.hub.to_agent(previous, {"do": "unassigned", "conversation": c.id, "reason": "requeued"})
                    await self.hub.event(c, "queued", self.engine.text(c.bot, "requeued", position=position),
                                         position=position, reason="agent_left")
                    await self.tell_queue(self.router.team_of_bot(c.bot))
                case Unavailable(reason=reason):
                    await self.hub.event(c, "unavailable", self.engine.text(c.bot, "unavailable"),
                                         reason=reason, available=False)
        finally:
            self.hub.forget_if_idle(c.id)

    async def _assigned(self, c: ConvState, agent_id: str, previous: str | None, *, transfer: bool) -> None:
        c.state, c.agent_id = HUMAN, agent_id
        name = await self.name_of(agent_id) or self.engine.text(c.bot, "an_agent")
        if previous and previous != agent_id:
            self.hub.to_agent(previous, {"do": "unassigned", "conversation": c.id,
                                         "reason": "transferred" if transfer else "requeued", "to": agent_id})
        conv = await self.storage.get_conversation(c.id)
        self.hub.to_agent(agent_id, {"do": "assigned", "conversation": conversation_dict(conv) if conv else c.summary(),
                                     "previous_agent": previous if transfer else None})
        kind = "transferred" if transfer else "assigned"
        await self.hub.event(c, kind, self.engine.text(c.bot, kind, agent=name), agent={"id": agent_id, "name": name})
        await self.tell_queue(self.router.team_of_bot(c.bot))

    async def tell_queue(self, team: str) -> None:
        """The team's agents, on every worker, get the team's queue."""
        self.hub.to_team(team, {"do": "queue", "conversations": await self.router.queue(team)})

    # -- commands from the broker (this worker's sockets of one agent, or of one team) ----------

    def on_agent_command(self, agent_id: str, command: dict[str, Any]) -> None:
        conns = self.registry.agent_conns(agent_id)
        if not conns:
            return
        match command.get("do"):
            case "send":
                for conn in conns:
                    conn.send(command["frame"])
            case "revoke":
                for conn in conns:
                    conn.send(P.error_frame(P.UNAUTHORIZED, "token revoked"))
                    conn.close(P.CLOSE_REVOKED, "token revoked")
            case "assigned" | "unassigned":
                self._serial.run(agent_id, lambda: self._apply(agent_id, command))

    async def _apply(self, agent_id: str, command: dict[str, Any]) -> None:
        conv = command["conversation"]
        if command["do"] == "assigned":
            c = await self.hub.get(conv["id"])
            c.state, c.agent_id = HUMAN, agent_id
            for conn in self.registry.agent_conns(agent_id):
                conn.send({"type": "assigned", "conversation": conv, "previous_agent": command.get("previous_agent")})
                conn.seen.pop(c.id, None)
                # An agent may answer as soon as "assigned" arrives, before the transcript's
                # replay has put the socket in the conversation: it owns it already.
                self._joining.add((id(conn), c.id))
                try:
                    await self.hub.subscribe(conn, c, 0)   # the whole transcript, bot turns included
                finally:
                    self._joining.discard((id(conn), c.id))
            self.hub.forget_if_idle(c.id)
            return
        frame = {"type": "unassigned", "conversation": conv, "reason": command.get("reason")}
        if command.get("to"):
            frame["to"] = command["to"]
        for conn in self.registry.agent_conns(agent_id):
            if conv in conn.conversations:
                self.hub.unsubscribe(conn, conv)
                conn.send(frame)

    def on_team_command(self, team: str, command: dict[str, Any]) -> None:
        if command.get("do") != "queue":
            return
        frame = {"type": "queue", "conversations": list(command.get("conversations") or [])}
        for conns in list(self.registry.by_agent.values()):
            for conn in conns:
                if conn.team == team:
                    conn.send(frame)

    # -- accounts and recovery ---------------------------------------------------------------

    async def check_tokens(self) -> int:
        """Close this worker's agent sockets whose token no longer holds: 4002 when the account's
        token version moved on (a password changed by any path: the console, REST, ``kefu agent
        password`` in another process, another node) or the account is gone; 4001 when the token
        expired.  A token is checked at hello, so without this a socket outlived both.  One
        query for every agent; returns how many sockets were closed."""
        if not self.registry.by_agent:
            return 0
        accounts = {a.id: a for a in await self.storage.list_agents()}
        now, closed = time.time(), 0
        for agent_id, conns in list(self.registry.by_agent.items()):
            account = accounts.get(agent_id)
            for conn in list(conns):
                if conn.closed:
                    continue
                if account is None or account.token_version != conn.token_version:
                    conn.send(P.error_frame(P.UNAUTHORIZED, "token revoked"))
                    conn.close(P.CLOSE_REVOKED, "token revoked")
                elif conn.token_expires <= now:
                    conn.send(P.error_frame(P.UNAUTHORIZED, "token expired: log in again"))
                    conn.close(P.CLOSE_UNAUTHORIZED, "token expired")
                else:
                    continue
                closed += 1
        if closed:
            self.metrics.inc("kefu_agent_sockets_revoked_total", closed)
        return closed

    def revoke(self, agent_id: str) -> None:
        """The agent's password changed: every live socket of theirs, on every worker, is
        closed (4002)."""
        self.hub.to_agent(agent_id, {"do": "revoke"})

    async def resync(self) -> None:
        """Tell routing again how many sockets of each agent this worker holds (after the
        shared state was lost or unreachable: counts missed meanwhile are corrected), and
        every local agent its queue."""
        for agent_id, (capacity, team, status) in list(self.profiles.items()):
            sockets = sum(1 for conn in self.registry.agent_conns(agent_id) if conn.routed)
            try:
                await self.router.announce(agent_id, sockets, capacity, team, status)
            except RoutingError as exc:
                log.warning("re-announcing agent %s failed: %s", agent_id, exc)
                continue
            if not sockets:
                del self.profiles[agent_id]
        for team in {conn.team for conns in self.registry.by_agent.values() for conn in conns if conn.team}:
            await self.tell_queue(team)


async def route_call(call: Awaitable[Any]) -> Any:
    """A routing call whose refusal reaches the client as an error frame (``not_owner`` reads
    as ``not_found``: someone else's conversation is no one's business)."""
    try:
        return await call
    except RoutingError as exc:
        code = "not_found" if exc.code in ("not_found", "not_owner") else exc.code
        raise P.FrameError(code, str(exc)) from None
