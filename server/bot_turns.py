"""Bot turns: a visitor's text -> ``engine.handle`` -> the bot's replies, stored; and the
handoff to a person.

* One turn at a time per conversation, in arrival order (``bot_lock``); never under any lock
  the message path takes, so a slow bot holds up nobody else.
* The humanized delay is shown as typing and cut short at shutdown (a reply is worth more
  than the pause); a turn slower than ``bot_timeout_s`` or failing hands off to a person.
* A handoff runs to its end even when the visitor's socket closes meanwhile.
* A reply the database will not store is retried; still not stored, the visitor is told
  (a transient ``notice``) and the conversation handed to a person.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any, Awaitable, Callable

from engine import Engine, InputError

from .config import Settings
from .conversations import ConvState, Conversations
from .metrics import Metrics
from .routing import Assigned, Queued, Router, RoutingError, Unavailable
from .storage.base import BOT, QUEUED, Storage, StorageError
from .tasks import run_to_end

log = logging.getLogger("kefu.server")

#: A bot reply the database refuses is tried this often, waiting STORE_RETRY_S, then twice that.
STORE_TRIES = 3
STORE_RETRY_S = 0.2


class BotTurns:
    def __init__(self, settings: Settings, *, engine: Engine, hub: Conversations, storage: Storage,
                 router: Router, metrics: Metrics) -> None:
        self.s, self.engine, self.hub, self.storage, self.router, self.metrics = (
            settings, engine, hub, storage, router, metrics)
        self.tasks: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()    # set by stop(): turns skip their typing delay
        #: the agent desk's "queue changed" (set at wiring)
        self.queue_changed: Callable[[str], Awaitable[None]] | None = None

    def start_turn(self, c: ConvState, text: str) -> None:
        task = asyncio.create_task(self._turn(c, text), name=f"kefu-bot-{c.id}")
        self.tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        """A turn nobody awaits: its failure is logged and counted, never lost silently."""
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.metrics.inc("kefu_background_failures_total", task="bot_turn")
            log.error("bot turn %s failed", task.get_name(), exc_info=task.exception())

    async def stop(self) -> None:
        """Let turns in progress store their replies (the visitor finds them on resume) for up
        to ``bot_timeout_s``; what is left is cancelled."""
        self.stopping.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.s.bot_timeout_s
        while self.tasks and loop.time() < deadline:   # (a turn may start a handoff meanwhile)
            await asyncio.wait(list(self.tasks), timeout=deadline - loop.time())
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _turn(self, c: ConvState, text: str) -> None:
        try:
            await self._answer(c, text)
        finally:
            self.hub.forget_if_idle(c.id)   # its last socket may have left during the turn

    async def _answer(self, c: ConvState, text: str) -> None:
        async with c.bot_lock:
            if c.state != BOT:
                return
            self.hub.typing(c, "bot", c.bot, True)
            try:
                turn = await asyncio.wait_for(self.engine.handle(c.bot, text, session=c.id), self.s.bot_timeout_s)
            except asyncio.TimeoutError:
                self.metrics.inc("kefu_bot_turns_total", outcome="timeout")
                self.hub.typing(c, "bot", c.bot, False)
                log.warning("bot %s did not answer within %ss; handing off %s", c.bot, self.s.bot_timeout_s, c.id)
                await self.handoff(c, "bot_timeout")
                return
            except InputError:
                self.hub.typing(c, "bot", c.bot, False)
                return
            except Exception:
                self.metrics.inc("kefu_bot_turns_total", outcome="error")
                self.hub.typing(c, "bot", c.bot, False)
                log.exception("bot %s failed; handing off %s", c.bot, c.id)
                await self.handoff(c, "bot_error")
                return
            if turn.delay_s > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(turn.delay_s):
                        await self.stopping.wait()
            self.hub.typing(c, "bot", c.bot, False)
            if c.state != BOT:   # the visitor asked for a person meanwhile
                return
            meta = {"intent": turn.intent, "confidence": round(float(turn.confidence), 4), "source": turn.source}
            if not await self._store_replies(c, turn.replies, meta):
                self.metrics.inc("kefu_bot_turns_total", outcome="store_failed")
                # Told at once, without storage (a transient notice), then a person takes over.
                self.hub.notice(c, self.engine.text(c.bot, "bot_trouble"))
                try:
                    await self.handoff(c, "bot_store_failed")
                except StorageError as exc:
                    log.error("handoff of %s failed too (%s): it stays with the bot", c.id, exc)
                    c.state = BOT
                return
            self.metrics.inc("kefu_bot_turns_total", outcome="handoff" if turn.handoff else "answered")
        if turn.handoff:
            await self.handoff(c, turn.handoff.reason)

    async def _store_replies(self, c: ConvState, replies: Any, meta: dict[str, Any]) -> bool:
        """Store the turn's replies, retrying a failing database (each reply has a client id,
        so a retry of a write that did commit stores nothing twice).  False: not stored."""
        turn_id = secrets.token_hex(8)
        for i, reply in enumerate(replies):
            kind = reply.kind if reply.kind in ("text", "handoff", "greeting") else "text"
            for attempt in range(STORE_TRIES):
                try:
                    await self.hub.append(c, role="bot", sender=c.bot, text=reply.text, kind=kind, meta=meta,
                                          client_id=f"bot-{turn_id}-{i}")
                    break
                except StorageError as exc:
                    if attempt == STORE_TRIES - 1:
                        log.error("bot %s: the reply in %s was not stored after %d tries (%s)", c.bot, c.id,
                                  STORE_TRIES, exc)
                        return False
                    await asyncio.sleep(STORE_RETRY_S * 2 ** attempt)
        return True

    async def handoff(self, c: ConvState, reason: str) -> None:
        """Bot -> a person: a state change; the bot stops answering at once.  It runs to its
        end even when the visitor's socket closes meanwhile (the handler is cancelled then):
        stopped half-way, the conversation would stay queued here and ``bot`` in storage,
        where no agent would ever see it."""
        await run_to_end(self._handoff(c, reason), self.tasks, orphan_failure=lambda exc: log.error(
            "handoff of %s failed after the visitor went away", c.id, exc_info=exc))

    async def _handoff(self, c: ConvState, reason: str) -> None:
        if c.state != BOT:
            return
        c.state = QUEUED   # provisional: stops the bot; the router's answer sets the real state
        try:
            result = await self.router.request_human(c.id)
        except RoutingError as exc:
            if exc.code != "routing_unavailable":
                raise
            log.warning("handoff of %s: %s; it waits in storage", c.id, exc)
            result = Unavailable(c.id, "routing_unavailable")
        match result:
            case Assigned():
                self.metrics.inc("kefu_handoffs_total", outcome="assigned")
                # the router notified the agent desk (assigned event) before returning
            case Queued(position=position):
                self.metrics.inc("kefu_handoffs_total", outcome="queued")
                c.state, c.agent_id = QUEUED, None
                await self.hub.event(c, "queued", self.engine.text(c.bot, "queued", position=position),
                                     position=position, reason=reason)
                await self._queue_changed(c)
            case Unavailable(reason=why):
                self.metrics.inc("kefu_handoffs_total", outcome="unavailable")
                # keep it queued in storage so agents see it (and get it offered) later
                conv = await self.storage.transition(c.id, to_state=QUEUED, agent_id=None, from_states=(BOT, QUEUED))
                c.state, c.agent_id = (conv.state, conv.agent_id) if conv else (QUEUED, None)
                key = "closed_hours" if why == "outside_business_hours" else "offline"
                await self.hub.event(c, "unavailable", self.engine.text(c.bot, key), reason=why, available=False)
                await self._queue_changed(c)

    async def _queue_changed(self, c: ConvState) -> None:
        if self.queue_changed is not None:
            await self.queue_changed(self.router.team_of_bot(c.bot))

