"""Built-in behaviour, written as an ordinary plugin whose impls are all ``trylast``.

A business plugin overrides any step by implementing the same hook; firstresult hooks
stop at its non-None result before reaching these.
"""
from __future__ import annotations

import string
from typing import Any

from .delays import humanized_delay
from .plugins import hookimpl
from .types import Answer, Classification, Handoff, IntentScore, Message, Reply

#: Score of a keyword hit in the ranking: strong, but a confident classifier outranks it.
KEYWORD_SCORE = 0.9
#: Fuzzy FAQ matches under this similarity (0-100) are not candidates.
FUZZY_CUTOFF = 80.0
HANDOFF_TEXT = "Let me pass you to one of our team, who will be with you shortly."
HANDOFF_TEXT_ZH = "正在为您转接人工客服，请稍候。"


@hookimpl(trylast=True)
def prepare_message(message: Message, bot: Any) -> Message:
    from dataclasses import replace

    return replace(message, normalized=bot.knowledge.prepare(message.text))


@hookimpl(trylast=True)
def classify_intent(message: Message, bot: Any) -> Any:
    """Score and rank every source; the best candidate wins."""
    kn = bot.knowledge
    text = message.normalized

    async def rank() -> Classification:
        if not text:
            return Classification((), in_scope=False, source="fallback")
        candidates: list[Classification] = []
        faq = kn.faq_exact(text)
        if faq is not None:
            candidates.append(Classification((IntentScore(faq.intent, 1.0),), True, "faq", faq.answer))
        hit = kn.keyword_hit(text)
        if hit is not None:
            candidates.append(Classification((IntentScore(hit[1], KEYWORD_SCORE),), True, "keyword"))
        model = await bot.classifier.classify(text)
        if model.ranked:
            candidates.append(model)
        fuzzy = kn.fuzzy_faq(text, FUZZY_CUTOFF)
        if fuzzy is not None:
            entry, score = fuzzy
            candidates.append(Classification((IntentScore(entry.intent, score / 100.0),), True, "fuzzy",
                                             entry.answer))
        if not candidates:
            return Classification((), in_scope=False, source="fallback")
        # Stable max: on a tie the earlier (more exact) source wins.
        return max(candidates, key=lambda c: c.confidence)

    return rank()


@hookimpl(trylast=True)
def should_handoff(message: Message, bot: Any, context: Any, classification: Classification) -> Handoff | bool:
    kn = bot.knowledge
    phrase = kn.asks_for_person(message.normalized)
    if phrase:
        return Handoff("asked", phrase)
    rules = kn.handoff
    if rules.understood(classification) and classification.intent in rules.intents:
        return Handoff("intent", classification.intent or "")
    if rules.max_misunderstood and context.counters.get("misunderstood", 0) >= rules.max_misunderstood:
        return Handoff("misunderstood", f"{context.counters['misunderstood']} turns not understood")
    return False


@hookimpl(trylast=True)
def answer(bot: Any, classification: Classification) -> Answer | None:
    if classification.matched_answer:
        return Answer((Reply(classification.matched_answer),), classification.source)
    texts = bot.knowledge.answers_for(classification.intent or "")
    if not texts:
        return None  # e.g. a model label the knowledge file no longer has: fall back
    return Answer((Reply(bot.knowledge.pick(texts, bot.rng)),), classification.source)


@hookimpl(trylast=True)
def fallback_reply(bot: Any) -> Reply:
    return Reply(bot.knowledge.pick(bot.knowledge.fallback, bot.rng))


class _KeepUnknown(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


@hookimpl(trylast=True)
def decorate_reply(reply: Reply, context: Any) -> Reply | None:
    if "{" not in reply.text:
        return None
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(reply.text) if name}
    except ValueError:
        return None  # a stray brace in an answer is text, not a template
    if not fields & set(context.slots):
        return None
    from dataclasses import replace

    try:
        text = reply.text.format_map(_KeepUnknown({k: str(v) for k, v in context.slots.items()}))
    except (ValueError, IndexError, AttributeError, KeyError):
        return None
    return replace(reply, text=text)


@hookimpl(trylast=True)
def reply_delay(reply: Reply, bot: Any) -> float:
    return humanized_delay(reply.text, bot.knowledge.delay, enabled=bot.delays_enabled, rng=bot.rng)


def handoff_text(bot: Any) -> str:
    for intent in bot.knowledge.handoff.intents:
        texts = bot.knowledge.answers_for(intent)
        if texts:
            return bot.knowledge.pick(texts, bot.rng)
    return HANDOFF_TEXT_ZH if bot.knowledge.cjk else HANDOFF_TEXT
