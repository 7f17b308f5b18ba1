"""The kefu plugin API: every hook a business bot can implement.

Hooks run in the order of a turn.  They are called with keyword arguments from one
place (:mod:`engine.dialog`), so an implementation may accept any subset of the
arguments, and specs can grow without breaking plugins.

pluggy is synchronous.  A hook that needs I/O decides synchronously and returns an
awaitable (an ``async def`` closure's coroutine); the engine awaits whatever is
awaitable.  Do not write ``async def`` directly on a firstresult hook: its coroutine is
never ``None``, so it would always win.

Every hook receives ``bot`` (an :class:`engine.bots.Bot`: ``bot.name``, ``bot.knowledge``,
``bot.classifier``) and is called for every bot of the engine: an implementation that
serves one business checks ``bot.name`` first and returns ``None`` for the others.

Built-in behaviour (:mod:`engine.defaults`) is itself a set of ``trylast`` plugins, so a
business plugin overrides any step by implementing the same hook.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - names for the annotations only
    from .bots import Bot
    from .dialog import Engine
    from .memory import SessionContext
    from .types import BotSpec, Classification, Handoff, Message, Reply

hookspec = pluggy.HookspecMarker("kefu")


# -- start-up ---------------------------------------------------------------------------


@hookspec
def register_bots() -> "list[BotSpec] | BotSpec | None":
    """Declare the bots this plugin provides.

    Called once when the engine starts; every implementation's result is used.  Two
    plugins declaring the same bot name is an error.
    """


@hookspec
def startup(engine: "Engine") -> Any:
    """Run once after every bot is loaded; may return an awaitable.

    :param engine: the engine that is starting.
    """


# -- one turn, in order -----------------------------------------------------------------


@hookspec(firstresult=True)
def prepare_message(message: "Message", bot: "Bot", context: "SessionContext") -> "Message | None":
    """Return the message with ``normalized`` text filled in (and slots extracted into
    ``context.slots`` if the plugin wishes).

    The default lower-cases, folds full-width forms, strips punctuation and applies
    the bot's synonyms.

    :param message: the visitor's message as received.
    :param bot: the bot answering.
    :param context: the session's memory (history, slots, counters).

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def classify_intent(message: "Message", bot: "Bot", context: "SessionContext") -> "Classification | Any | None":
    """Return the ranked intents for the message (or an awaitable of them).

    The default ranks the candidates of every source (FAQ exact hit, keywords, the
    bot's classifier, fuzzy FAQ match) and keeps the best.

    :param message: the prepared message (``message.normalized`` is filled in).
    :param bot: the bot answering.
    :param context: the session's memory.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def should_handoff(
    message: "Message", bot: "Bot", context: "SessionContext", classification: "Classification"
) -> "Handoff | bool | None":
    """Decide whether the bot passes the visitor to a person.

    Return a :class:`engine.types.Handoff` to hand off, ``False`` to keep the bot
    answering, ``None`` to leave the decision to the next plugin.  The default applies
    the bot's rules: an intent marked ``handoff``, the visitor asking for a person, or
    ``max_misunderstood`` turns in a row under ``min_confidence``.

    :param message: the prepared message.
    :param bot: the bot answering.
    :param context: the session's memory; ``context.counters["misunderstood"]`` counts
        the not-understood turns in a row, this one included.
    :param classification: the result of ``classify_intent``.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def answer(
    message: "Message", bot: "Bot", context: "SessionContext", classification: "Classification"
) -> Any:
    """Return the bot's replies for an understood message: a ``Reply``, a string, a list
    of them, an :class:`engine.types.Answer`, or an awaitable of any of these.

    The default answers from the knowledge base (an intent's answers, inherited from
    its nearest ancestor; the FAQ's answer).  A result from any other plugin is
    reported with source ``plugin``.

    :param message: the prepared message.
    :param bot: the bot answering.
    :param context: the session's memory.
    :param classification: the result of ``classify_intent`` (in scope).

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def fallback_reply(message: "Message", bot: "Bot", context: "SessionContext") -> "Reply | str | None":
    """Return the reply for a message the bot did not understand.

    The default picks one of the bot's ``fallback`` texts.

    :param message: the prepared message.
    :param bot: the bot answering.
    :param context: the session's memory.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def decorate_reply(reply: "Reply", message: "Message", bot: "Bot", context: "SessionContext") -> "Reply | None":
    """Return a changed reply, or ``None`` to keep it; called once per reply.

    The default fills ``{slot}`` placeholders from ``context.slots`` (unknown ones are
    left as written).

    :param reply: the reply about to be sent.
    :param message: the prepared message.
    :param bot: the bot answering.
    :param context: the session's memory.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def reply_delay(reply: "Reply", bot: "Bot", context: "SessionContext") -> "float | None":
    """Return the humanized delay in seconds before sending the reply.

    The default draws uniformly between the bot's ``delay.min_ms`` and ``max_ms`` and
    adds ``per_char_ms`` for each character; zero when delays are disabled.  The engine
    never sleeps: callers apply the delay with ``asyncio.sleep``.

    :param reply: the reply about to be sent.
    :param bot: the bot answering.
    :param context: the session's memory.

    Stops at the first non-None result.
    """


@hookspec
def track_event(event: str, data: "dict[str, Any]", bot: "Bot", context: "SessionContext") -> Any:
    """Observe a turn's events (``turn``, ``handoff``, ``fallback``); every
    implementation is called, results are ignored, errors are logged and swallowed.

    :param event: the event's name.
    :param data: what happened (intent, confidence, source, ...).
    :param bot: the bot answering.
    :param context: the session's memory.
    """
