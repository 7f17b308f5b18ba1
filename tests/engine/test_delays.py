"""Humanized delays stay within their bounds and are zero when disabled."""
import random

from engine.delays import MAX_DELAY_S, humanized_delay
from engine.knowledge import DelaySettings


def test_delay_is_drawn_between_min_and_max():
    settings = DelaySettings(min_ms=150, max_ms=300)
    rng = random.Random(1)
    delays = [humanized_delay("hi", settings, rng=rng) for _ in range(2000)]
    assert 0.150 <= min(delays) < 0.160 and 0.290 < max(delays) <= 0.300


def test_typing_time_adds_per_character():
    settings = DelaySettings(min_ms=100, max_ms=100, per_char_ms=10)
    assert humanized_delay("x" * 20, settings) == 0.3


def test_delay_is_capped_for_long_texts():
    assert humanized_delay("x" * 100_000, DelaySettings(per_char_ms=50)) == MAX_DELAY_S


def test_disabled_delays_are_zero():
    assert humanized_delay("hello", DelaySettings(), enabled=False) == 0.0


def test_engine_reports_the_bot_delay_and_zero_when_configured(mini_engine):
    # mini.yaml: 100-200 ms plus 10 ms a character.
    turn = mini_engine(delays=True).ask("mini", "i want a refund")
    chars = len(turn.answer)
    assert 0.1 + chars * 0.01 <= turn.delay_s <= 0.2 + chars * 0.01
    assert mini_engine().ask("mini", "i want a refund").delay_s == 0.0
