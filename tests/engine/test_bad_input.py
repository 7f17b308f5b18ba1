"""Odd input gets a clear error or the fallback answer, never a traceback."""
import pytest

from engine import InputError, UnknownBotError


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_or_whitespace_text_is_a_clear_error(mini_engine, text):
    with pytest.raises(InputError, match="text is empty"):
        mini_engine().ask("mini", text)


def test_100kb_of_text_is_refused_with_the_limit(mini_engine):
    with pytest.raises(InputError, match="102400 characters long; the limit is 10000"):
        mini_engine().ask("mini", "a" * 102_400)


def test_long_but_allowed_text_is_answered(mini_engine):
    turn = mini_engine().ask("mini", "where is my order " * 500)
    assert turn.intent == "order/status"


def test_control_characters_are_ignored(mini_engine):
    assert mini_engine().ask("mini", "where\x00 is\x1b my\u200b order\x7f").intent == "order/status"


def test_punctuation_only_text_gets_the_fallback(mini_engine):
    turn = mini_engine().ask("mini", "?!?!...")
    assert turn.source == "fallback" and turn.answer == "Sorry, I did not get that."


def test_mixed_scripts_and_emoji_do_not_break_matching(mini_engine):
    turn = mini_engine().ask("mini", "где where is my order 订单 🚚")
    assert turn.intent == "order/status"
    assert mini_engine().ask("mini", "🚚🚚🚚").source == "fallback"


def test_non_string_text_is_an_input_error(mini_engine):
    with pytest.raises(InputError):
        mini_engine().ask("mini", None)


def test_unknown_bot_names_the_known_ones(mini_engine):
    with pytest.raises(UnknownBotError, match=r"unknown bot 'nope' \(known bots: mini\)"):
        mini_engine().ask("nope", "hi")


def test_unknown_bot_in_config_fails_at_start(mini_engine):
    with pytest.raises(UnknownBotError, match="'ghost'"):
        mini_engine(bots=["ghost"])
