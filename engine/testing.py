"""Helpers for testing bots and plugins, the same ones kefu's own tests use.

``engine_for()`` gives a started engine with zero delays, in-memory sessions and the
knowledge classifier (no trained model), driven synchronously::

    eng = engine_for()
    turn = eng.ask("shop", "where is my parcel?", session="t1")
"""
from __future__ import annotations

import asyncio
from typing import Any, Iterable

from .config import load_config
from .dialog import Engine
from .types import Turn


class SyncEngine:
    """A started :class:`Engine` on a private event loop, for tests and the CLI."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._loop = asyncio.new_event_loop()
        self.run(engine.start())

    def run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    def ask(self, bot: str, text: str, session: str = "default", **meta: Any) -> Turn:
        return self.run(self.engine.handle(bot, text, session=session, meta=meta or None))

    def suggest(self, bot: str, prefix: str, limit: int = 5) -> list[str]:
        return self.engine.suggest(bot, prefix, limit)

    def close(self) -> None:
        if not self._loop.is_closed():
            self.run(self.engine.close())
            self._loop.close()

    def __enter__(self) -> "SyncEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def testing_config(**engine_settings: Any):
    """Config for tests: no delays, no trained models, no file watching."""
    settings = {"delays": False, "use_models": False, "watch_knowledge": False, "seed": 0}
    settings.update(engine_settings)
    config = load_config(env={})
    config["engine"].update(settings)
    return config


def engine_for(plugins: Iterable[object] = (), load_entrypoints: bool = True, **engine_settings: Any) -> SyncEngine:
    return SyncEngine(Engine(testing_config(**engine_settings), plugins=plugins, load_entrypoints=load_entrypoints))
