"""One test per hook: a test plugin overrides the built-in step (the built-ins are trylast).

tests/engine/test_hookspecs.py checks that every hook in engine/hookspecs.py has a
``test_hook_<name>`` here.
"""
from __future__ import annotations

import asyncio

import pytest

from engine import (Answer, BotSpec, Classification, Handoff, IntentScore, PluginError, Reply, hookimpl)

from .conftest import MINI


def test_hook_register_bots(mini_engine):
    class Second:
        @hookimpl
        def register_bots(self):
            return [BotSpec(name="mini2", knowledge=MINI.parent / "mini2.yaml")]

    (MINI.parent / "mini2.yaml").write_text(MINI.read_text().replace("bot: mini", "bot: mini2"))
    try:
        eng = mini_engine(Second())
        assert sorted(eng.bots) == ["mini", "mini2"]
        assert eng.ask("mini2", "where is my order").intent == "order/status"
    finally:
        (MINI.parent / "mini2.yaml").unlink()


def test_register_bots_twice_is_an_error(mini_engine):
    class Dup:
        @hookimpl
        def register_bots(self):
            return BotSpec(name="mini", knowledge=MINI)

    with pytest.raises(PluginError, match="registered twice"):
        mini_engine(Dup())


def test_hook_startup(mini_engine):
    seen = []

    class Starter:
        @hookimpl
        def startup(self, engine):
            async def later():
                seen.append(sorted(engine.bots))
            return later()

    mini_engine(Starter())
    assert seen == [["mini"]]


def test_hook_prepare_message(mini_engine):
    class Upper:
        @hookimpl
        def prepare_message(self, message, bot):
            from dataclasses import replace
            # Map a private code word onto a phrase the bot knows.
            text = "where is my order" if "xyzzy" in message.text else bot.knowledge.prepare(message.text)
            return replace(message, normalized=text)

    turn = mini_engine(Upper()).ask("mini", "xyzzy")
    assert turn.intent == "order/status"


def test_hook_classify_intent_may_return_an_awaitable(mini_engine):
    class Fixed:
        @hookimpl
        def classify_intent(self, message):
            async def classify():
                await asyncio.sleep(0)
                return Classification((IntentScore("refund", 0.99),), in_scope=True, source="model")
            return classify() if "special" in message.text else None

    eng = mini_engine(Fixed())
    assert eng.ask("mini", "something special").intent == "refund"
    assert eng.ask("mini", "where is my order").intent == "order/status"  # None: built-in decides


def test_hook_classify_intent(mini_engine):
    class Fixed:
        @hookimpl
        def classify_intent(self):
            return Classification((IntentScore("order/cancel", 0.8),), in_scope=True, source="model")

    turn = mini_engine(Fixed()).ask("mini", "where is my order")
    assert (turn.intent, turn.confidence, turn.source) == ("order/cancel", 0.8, "model")


def test_hook_should_handoff(mini_engine):
    class Vip:
        @hookimpl
        def should_handoff(self, message):
            return Handoff("plugin", "vip") if "vip" in message.normalized else None

    eng = mini_engine(Vip())
    turn = eng.ask("mini", "vip customer here, where is my order")
    assert turn.handoff == Handoff("plugin", "vip")
    assert eng.ask("mini", "where is my order").handoff is None


def test_should_handoff_false_overrides_the_built_in_rules(mini_engine):
    class Never:
        @hookimpl
        def should_handoff(self):
            return False

    assert mini_engine(Never()).ask("mini", "i need an agent").handoff is None


def test_hook_answer(mini_engine):
    class Custom:
        @hookimpl
        def answer(self, classification):
            if classification.intent == "refund":
                return [Reply("Refund started."), "Anything else?"]
            return None

    eng = mini_engine(Custom())
    turn = eng.ask("mini", "i want a refund")
    assert turn.answer == "Refund started.\nAnything else?"
    assert turn.source == "plugin"
    assert eng.ask("mini", "cancel my order").source == "model"


def test_answer_hook_may_name_its_source_and_return_an_awaitable(mini_engine):
    class Custom:
        @hookimpl
        def answer(self):
            async def lookup():
                return Answer((Reply("from the CRM"),), source="crm")
            return lookup()

    turn = mini_engine(Custom()).ask("mini", "i want a refund")
    assert (turn.answer, turn.source) == ("from the CRM", "crm")


def test_hook_fallback_reply(mini_engine):
    class Polite:
        @hookimpl
        def fallback_reply(self):
            return "Could you say that another way?"

    turn = mini_engine(Polite()).ask("mini", "qwrtzp zzxv")
    assert turn.source == "fallback"
    assert turn.answer == "Could you say that another way?"


def test_hook_decorate_reply(mini_engine):
    class Sign:
        @hookimpl
        def decorate_reply(self, reply):
            return Reply(reply.text + " -- mini team")

    assert mini_engine(Sign()).ask("mini", "i want a refund").answer == "Refunds take 5 days. -- mini team"


def test_decorate_reply_default_fills_slots_and_keeps_unknown_placeholders(mini_engine):
    class Slot:
        @hookimpl
        def prepare_message(self, message, bot, context):
            if "42" in message.text:
                context.slots["order_id"] = "42"
            return None

    eng = mini_engine(Slot())
    assert eng.ask("mini", "where is my order", session="a").answer == "Order {order_id} is on its way."
    assert eng.ask("mini", "where is my order 42", session="b").answer == "Order 42 is on its way."


def test_hook_reply_delay(mini_engine):
    class Slow:
        @hookimpl
        def reply_delay(self):
            return 1.5

    assert mini_engine(Slow()).ask("mini", "i want a refund").delay_s == 1.5


def test_hook_track_event(mini_engine):
    events = []

    class Tracker:
        @hookimpl
        def track_event(self, event, data):
            events.append((event, data.get("intent")))

    class Broken:
        @hookimpl
        def track_event(self):
            raise RuntimeError("observer bug")

    eng = mini_engine(Tracker(), Broken())
    eng.ask("mini", "i want a refund")
    eng.ask("mini", "i need an agent")
    eng.ask("mini", "qwrtzp zzxv")
    assert events == [("turn", "refund"), ("turn", "human_agent"), ("handoff", None),
                      ("turn", None), ("fallback", None)]


def test_misspelt_hook_fails_loudly_at_start_up(mini_engine):
    class Typo:
        @hookimpl
        def anwser(self):
            return "never"

    with pytest.raises(PluginError, match="anwser"):
        mini_engine(Typo())


def test_a_failing_plugin_gives_the_fallback_answer_not_a_traceback(mini_engine):
    class Buggy:
        @hookimpl
        def answer(self):
            raise ZeroDivisionError("plugin bug")

    turn = mini_engine(Buggy()).ask("mini", "i want a refund")
    assert turn.source == "fallback"
    assert turn.answer == "Sorry, I did not get that."
