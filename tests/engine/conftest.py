from pathlib import Path

import pytest

from engine import BotSpec, hookimpl
from engine.testing import engine_for

DATA = Path(__file__).parent / "data"
MINI = DATA / "mini.yaml"


class MiniBot:
    """Registers the small test bot of tests/engine/data/mini.yaml."""

    def __init__(self, path: Path = MINI) -> None:
        self.path = path

    @hookimpl
    def register_bots(self):
        return BotSpec(name="mini", knowledge=self.path)


@pytest.fixture
def mini_engine():
    def make(*plugins, path: Path = MINI, **settings):
        return engine_for(plugins=[MiniBot(path), *plugins], load_entrypoints=False, **settings)

    engines = []

    def tracked(*plugins, **kw):
        eng = make(*plugins, **kw)
        engines.append(eng)
        return eng

    yield tracked
    for eng in engines:
        eng.close()
