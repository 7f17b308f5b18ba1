"""The dialog engine: a turn in, a :class:`Turn` out, through the plugin hooks.

This module is the only caller of ``pm.hook.*``: :meth:`Engine._call` calls a hook with
keyword arguments and awaits whatever comes back awaitable.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

from . import paths
from .bots import Bot
from .config import Config, load_config
from .defaults import handoff_text
from .errors import InputError, KefuError, KnowledgeError, PluginError, UnknownBotError
from .memory import InMemoryStore, MemoryStore, SessionContext
from .plugins import make_plugin_manager
from .types import Answer, BotSpec, Classification, Handoff, Message, Reply, Turn

log = logging.getLogger("kefu.engine")

#: Longest text a turn accepts.  Matching looks at the first 1,000 characters anyway;
#: past this the caller gets a clear error instead of silent truncation.
MAX_TEXT_CHARS = 10_000


class Engine:
    """Bots, their plugins and the session memory of one process (or one worker)."""

    def __init__(self, config: Config | None = None, plugins: Iterable[object] = (),
                 load_entrypoints: bool = True, memory: MemoryStore | None = None) -> None:
        self.config = config or load_config()
        self.settings = self.config["engine"]
        self.pm = make_plugin_manager(plugins, load_entrypoints=load_entrypoints)
        self.memory = memory or InMemoryStore(int(self.settings["memory_max_sessions"]),
                                              float(self.settings["memory_ttl_s"]))
        self.bots: dict[str, Bot] = {}
        self._watch_task: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> "Engine":
        specs: dict[str, BotSpec] = {}
        for result in self.pm.hook.register_bots():
            for spec in result if isinstance(result, (list, tuple)) else [result]:
                if spec is None:
                    continue
                if not isinstance(spec, BotSpec):
                    raise PluginError(f"register_bots returned {spec!r}, expected engine.BotSpec")
                if spec.name in specs:
                    raise PluginError(f"bot {spec.name!r} is registered twice")
                specs[spec.name] = spec
        wanted = list(self.settings["bots"] or specs)
        for name in wanted:
            if name not in specs:
                raise UnknownBotError(name, list(specs))
        for name in wanted:
            self.bots[name] = self._load_bot(specs[name])
        await self._call("startup", engine=self, _all=True)
        return self

    def _load_bot(self, spec: BotSpec) -> Bot:
        knowledge_dir = self.settings["knowledge_dir"]
        if knowledge_dir and not Path(spec.knowledge).is_absolute():
            spec = replace(spec, knowledge=Path(knowledge_dir) / spec.knowledge)
        model_dir = spec.model_dir
        if model_dir is None:
            model_dir = Path(self.settings["models_dir"] or paths.models_dir()) / spec.name
        seed = self.settings.get("seed")
        bot = Bot.load(spec, model_dir, use_model=bool(self.settings["use_models"]),
                       model_threads=int(self.settings["model_threads"]),
                       seed=None if seed in (None, "") else int(seed))
        bot.delays_enabled = bool(self.settings["delays"])
        return bot

    async def close(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()
            try:
                await self._watch_task
            except asyncio.CancelledError:
                pass
            self._watch_task = None
        for bot in self.bots.values():
            bot.classifier.close()
        await self.memory.close()

    async def __aenter__(self) -> "Engine":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- bots and knowledge ------------------------------------------------------------

    def bot(self, name: str) -> Bot:
        try:
            return self.bots[name]
        except KeyError:
            raise UnknownBotError(name, list(self.bots)) from None

    def reload(self, name: str | None = None) -> dict[str, KnowledgeError | None]:
        """Reload one bot's knowledge (or every bot's); a broken file keeps the old one live."""
        names = [name] if name else list(self.bots)
        return {n: self.bot(n).reload() for n in names}

    def watch(self) -> asyncio.Task:
        """Start reloading knowledge files when they change (one task for every bot)."""
        if self._watch_task is None:
            self._watch_task = asyncio.create_task(self._watch(), name="kefu-knowledge-watch")
        return self._watch_task

    async def _watch(self) -> None:
        interval = float(self.settings["watch_interval_s"])
        while True:
            await asyncio.sleep(interval)
            for bot in list(self.bots.values()):
                if bot.changed_on_disk():
                    bot.reload()

    def suggest(self, bot: str, prefix: str, limit: int = 5) -> list[str]:
        return self.bot(bot).knowledge.suggest(prefix, limit)

    def greeting(self, bot: str) -> str:
        return self.bot(bot).knowledge.greeting

    def text(self, bot: str, key: str, **fields: Any) -> str:
        """The bot's system text ``key`` (engine/texts.py: ``queued``, ``assigned``, ...) in its
        language, or as its knowledge file's ``texts:`` words it, with ``fields`` filled in
        (``position=3``, ``agent="Li"``).  Fields the text does not use are ignored; an
        unknown key is a KeyError."""
        return self.bot(bot).knowledge.text(key, **fields)

    # -- a turn ------------------------------------------------------------------------

    async def handle(self, bot: str, text: str, session: str = "default",
                     meta: dict[str, Any] | None = None) -> Turn:
        """Answer one visitor message.  Never raises for odd text: only for an unknown
        bot or unusable input (InputError, with the reason)."""
        the_bot = self.bot(bot)
        text = check_text(text)
        context = await self.memory.load(bot, session)
        message = Message(text=text, bot=bot, session=session, meta=meta or {})
        try:
            turn = await self._turn(the_bot, message, context)
        except KefuError:
            raise
        except Exception:  # a plugin bug must not take the conversation down
            log.exception("bot %s: a plugin failed on a turn; answering with the fallback", bot)
            reply = Reply(the_bot.knowledge.pick(the_bot.knowledge.fallback, the_bot.rng))
            turn = Turn(bot, session, text, None, 0.0, "fallback", (reply,))
        context.remember("visitor", text, turn.intent)
        for reply in turn.replies:
            context.remember("bot", reply.text)
        await self.memory.put(context)
        return turn

    async def _turn(self, bot: Bot, message: Message, context: SessionContext) -> Turn:
        kw = {"bot": bot, "context": context}
        message = await self._call("prepare_message", message=message, **kw) or message
        classification: Classification = await self._call("classify_intent", message=message, **kw)
        if classification is None:
            classification = Classification((), in_scope=False, source="fallback")
        understood = bot.knowledge.handoff.understood(classification)
        misunderstood = 0 if understood else context.counters.get("misunderstood", 0) + 1
        context.counters["misunderstood"] = misunderstood
        context.counters["turns"] = context.counters.get("turns", 0) + 1
        handoff = await self._call("should_handoff", message=message, classification=classification, **kw)
        if handoff is True:
            handoff = Handoff("plugin")
        intent = classification.intent if understood else None
        source = classification.source if understood else "fallback"
        replies: tuple[Reply, ...]
        if handoff:
            replies = (Reply(handoff_text(bot), kind="handoff"),)
            context.counters["misunderstood"] = 0
        else:
            replies, source = await self._answer(bot, message, context, classification, understood, source)
        decorated = []
        delay = 0.0
        for reply in replies:
            changed = await self._call("decorate_reply", reply=reply, message=message, **kw)
            reply = changed or reply
            delay += float(await self._call("reply_delay", reply=reply, **kw) or 0.0)
            decorated.append(reply)
        turn = Turn(bot=bot.name, session=message.session, text=message.text, intent=intent,
                    confidence=classification.confidence, source=source, replies=tuple(decorated),
                    handoff=handoff or None, delay_s=delay)
        await self._track("turn", turn.as_dict(), bot, context)
        if handoff:
            await self._track("handoff", {"reason": handoff.reason, "detail": handoff.detail}, bot, context)
        elif source == "fallback":
            await self._track("fallback", {"text": message.text}, bot, context)
        return turn

    async def _answer(self, bot: Bot, message: Message, context: SessionContext,
                      classification: Classification, understood: bool, source: str):
        kw = {"message": message, "bot": bot, "context": context}
        if understood:
            result = await self._call("answer", classification=classification, **kw)
            replies = _as_replies(result)
            if replies:
                return replies, result.source if isinstance(result, Answer) else "plugin"
        fallback = await self._call("fallback_reply", **kw)
        return _as_replies(fallback) or (Reply(bot.knowledge.fallback[0]),), "fallback"

    async def _track(self, event: str, data: dict, bot: Bot, context: SessionContext) -> None:
        # Each observer separately: pluggy stops a call at the first exception, and one
        # broken observer must neither break the turn nor silence the others.
        kwargs = {"event": event, "data": data, "bot": bot, "context": context}
        for impl in self.pm.hook.track_event.get_hookimpls():
            try:
                result = impl.function(*[kwargs[arg] for arg in impl.argnames])
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("track_event(%s) failed in plugin %s", event, impl.plugin_name)

    async def _call(self, name: str, _all: bool = False, **kwargs: Any) -> Any:
        """Call hook ``name`` with keyword arguments; await whatever is awaitable."""
        result = getattr(self.pm.hook, name)(**kwargs)
        if _all:
            return [await r if inspect.isawaitable(r) else r for r in result]
        if inspect.isawaitable(result):
            result = await result
        if callable(result) and not isinstance(result, (Reply, Answer, Classification, Handoff, str)):
            result = result()
            if inspect.isawaitable(result):
                result = await result
        return result


def check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise InputError("text must be a string")
    if not text.strip():
        raise InputError("text is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(f"text is {len(text)} characters long; the limit is {MAX_TEXT_CHARS}")
    return text


def _as_replies(result: Any) -> tuple[Reply, ...]:
    if result is None:
        return ()
    if isinstance(result, Answer):
        return tuple(result.replies)
    if isinstance(result, (Reply, str)):
        result = [result]
    out = []
    for item in result:
        if isinstance(item, Reply):
            out.append(item)
        elif isinstance(item, str) and item:
            out.append(Reply(item))
        elif item is not None:
            raise PluginError(f"a hook returned {item!r}; expected a Reply or a string")
    return tuple(out)
