"""System texts a visitor sees from the chat (queued, assigned, closed...), per language.

These are not answers: the chat server shows them when a conversation changes state.
Each bot gets the built-in texts of its ``language``; the optional ``texts:`` section of
its knowledge file replaces any of them (validated in :mod:`engine.knowledge`). Read them
with ``Engine.text(bot, key, **fields)``.

A text is a ``str.format`` template: each key takes a fixed set of placeholders
(:data:`PLACEHOLDERS`), written ``{name}``; ``{{`` and ``}}`` are literal braces.
"""
from __future__ import annotations

import re
import string

#: Every key and the placeholders its text may use: the one place that defines both.
PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "queued": ("position",),
    "requeued": ("position",),
    "offline": (),
    "closed_hours": (),
    "unavailable": (),
    "assigned": ("agent",),
    "transferred": ("agent",),
    "closed": (),
    "bot_trouble": (),
    "an_agent": (),
}

KEYS: tuple[str, ...] = tuple(PLACEHOLDERS)

#: Built-in texts by language (the languages of ``engine.knowledge.LANGUAGES``).
DEFAULTS: dict[str, dict[str, str]] = {
    "en": {
        "queued": "Connecting you to a person. You are number {position} in the queue.",
        "requeued": "Your agent had to leave. You are number {position} in the queue for the next person.",
        "offline": "No agent is online right now. Leave a message and we will get back to you.",
        "closed_hours": "We are outside our opening hours right now. Leave a message and we will get back to you.",
        "unavailable": "No agent is available right now. Leave a message and we will get back to you.",
        "assigned": "You are now chatting with {agent}.",
        "transferred": "{agent} is taking over your conversation.",
        "closed": "The conversation was closed.",
        "bot_trouble": "Sorry, I could not answer that just now. Let me find a person for you.",
        "an_agent": "an agent",
    },
    "zh": {
        "queued": "正在为您转接人工客服，您当前排在第 {position} 位，请稍候～",
        "requeued": "抱歉，刚才的客服有事暂时离开了，正在为您转接下一位客服，您现在排在第 {position} 位，请稍候～",
        "offline": "当前暂无人工客服在线，您可以先留言，我们会尽快回复您。",
        "closed_hours": "现在不在人工客服的服务时间内，您可以先留言，我们上班后会尽快回复您。",
        "unavailable": "当前暂无可接待的人工客服，您可以先留言，我们会尽快回复您。",
        "assigned": "现在由{agent}为您服务，请问有什么可以帮您？",
        "transferred": "接下来由{agent}继续为您服务。",
        "closed": "本次会话已结束，感谢您的咨询，祝您生活愉快！",
        "bot_trouble": "抱歉，这个问题我暂时回答不了，正在为您转接人工客服，请稍候～",
        "an_agent": "人工客服",
    },
}


def builtin(language: str) -> dict[str, str]:
    """A copy of the built-in texts of a language (English for one without its own)."""
    return dict(DEFAULTS.get(language, DEFAULTS["en"]))


def fields_of(template: str) -> tuple[str, ...]:
    """The placeholder names a template uses, in order; ValueError if it is malformed.

    Only plain ``{name}`` counts as a placeholder: a positional ``{}``/``{0}``, an
    attribute or index (``{agent.name}``), a conversion (``!r``) or a format spec
    (``:>5``) is returned whole, so it is reported as a placeholder the key does not take.
    """
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        whole = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
        names.append(whole)
    return tuple(names)


def check(key: str, template: str) -> list[str]:
    """What is wrong with a template for a key: one message per problem, none when usable."""
    allowed = PLACEHOLDERS[key]
    takes = (f"allowed: {', '.join('{' + a + '}' for a in allowed)}" if allowed
             else "it takes no placeholders")
    try:
        used = fields_of(template)
    except ValueError as exc:
        return [f"texts.{key} is not a valid template: {exc} (write {{{{ and }}}} for a literal brace; "
                f"{takes})"]
    out = []
    for name in dict.fromkeys(used):
        if name in allowed:
            continue
        bare = re.split(r"[.\[!:]", name, maxsplit=1)[0]
        if bare in allowed:
            out.append(f"texts.{key} has placeholder {{{name}}}: write it plainly as {{{bare}}} "
                       f"(no conversion, format spec, attribute or index; {takes})")
        else:
            out.append(f"texts.{key} has placeholder {{{name}}}, which {key} does not take ({takes})")
    return out
