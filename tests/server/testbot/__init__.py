"""A test-only bot plugin: knowledge from testbot.yaml; any text containing "hang" never
answers (to test the server's bot timeout)."""
from __future__ import annotations

import asyncio
from pathlib import Path

from engine import BotSpec, hookimpl

KNOWLEDGE = Path(__file__).with_name("testbot.yaml")


@hookimpl
def register_bots():
    return BotSpec(name="testbot", knowledge=KNOWLEDGE, description="server tests")


@hookimpl
def classify_intent(message, bot, context):
    if bot.name == "testbot" and "hang" in message.text:
        async def forever():
            await asyncio.sleep(3600)
        return forever()
    return None
