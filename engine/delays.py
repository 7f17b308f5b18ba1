"""Humanized reply delays: a random pause plus typing time.

The engine only computes the delay; the caller applies it with ``asyncio.sleep`` while
showing a typing indicator, so nothing ever blocks.  ``enabled=False`` (tests,
benchmarks) makes every delay zero.
"""
from __future__ import annotations

import random

from .knowledge import DelaySettings

#: A reply never waits longer than this, whatever the settings and text length say.
MAX_DELAY_S = 10.0


def humanized_delay(text: str, settings: DelaySettings, enabled: bool = True,
                    rng: random.Random | None = None) -> float:
    if not enabled:
        return 0.0
    base = (rng or random).uniform(settings.min_ms, settings.max_ms)
    typing = settings.per_char_ms * len(text)
    return min(MAX_DELAY_S, (base + typing) / 1000.0)
