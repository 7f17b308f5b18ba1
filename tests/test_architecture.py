"""The dependency direction of docs/architecture.md, checked on the source.

engine imports none of server, plugins, models; plugins import only engine's public
names; server imports neither plugins nor models; serving never imports torch.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "plugins", "server", "models")


def imports_of(package: str) -> list[tuple[str, str]]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(str(path.relative_to(ROOT)), alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found += [(str(path.relative_to(ROOT)), node.module)]
    return found


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package,forbidden", [
    ("engine", {"server", "plugins", "models", "torch", "transformers"}),
    ("server", {"plugins", "models", "torch", "transformers"}),
    ("plugins", {"server", "models", "torch", "transformers"}),
])
def test_package_imports_none_of_the_forbidden_packages(package, forbidden):
    bad = [(where, name) for where, name in imports_of(package) if top(name) in forbidden]
    assert bad == []


def test_plugins_import_only_the_engines_public_names():
    deep = [(where, name) for where, name in imports_of("plugins")
            if top(name) == "engine" and name not in ("engine", "engine.testing")]
    assert deep == [], "plugins must import from `engine` itself, not its modules"


def test_starting_the_engine_and_server_imports_no_torch_or_transformers():
    code = (
        "import sys, importlib.util\n"
        "import engine, engine.cli, engine.dialog\n"
        "from engine.testing import engine_for\n"
        "eng = engine_for(); eng.close()\n"
        "if importlib.util.find_spec('server.app'):\n"
        "    import server.app\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def _calls(path: Path, attr: str) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr]


def _server_modules() -> list[Path]:
    return sorted(p for p in (ROOT / "server").rglob("*.py") if "storage" not in p.relative_to(ROOT).parts[1:2])


def test_only_the_hub_publishes_and_fans_out():
    """docs/architecture.md: every frame for a conversation, an agent or a team goes through
    server/conversations.py, so the broker seam (in process or Redis) is in one place."""
    allowed = {"server/conversations.py": {"publish", "to_conversation"},
               "server/redis_broker.py": {"publish"}}          # its pipeline's PUBLISH, the seam itself
    bad = []
    for path in _server_modules():
        rel = str(path.relative_to(ROOT))
        for attr in ("publish", "to_conversation"):
            if attr not in allowed.get(rel, set()):
                bad += [f"{rel}:{line} calls .{attr}()" for line in _calls(path, attr)]
    assert bad == []


def test_sessions_never_touch_storage():
    """A socket's loop (server/sessions.py) dispatches frames; what is stored goes through the
    desks and the hub."""
    path = ROOT / "server" / "sessions.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    touches = [node.lineno for node in ast.walk(tree)
               if (isinstance(node, ast.Attribute) and node.attr == "storage")
               or (isinstance(node, ast.Name) and node.id == "storage")]
    imports = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and node.module and node.module.startswith("storage") and node.module != "storage.base"]
    assert touches == [] and imports == []
