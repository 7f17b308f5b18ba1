"""The hookspec module is the plugin API's document: keep it honest."""
import inspect
import re
from pathlib import Path

from engine import hookspecs

HOOKS = {name: fn for name, fn in vars(hookspecs).items()
         if inspect.isfunction(fn) and hasattr(fn, "kefu_spec")}


def test_every_hook_is_documented_with_a_param_line_per_argument():
    assert len(HOOKS) >= 10
    for name, fn in HOOKS.items():
        doc = inspect.getdoc(fn) or ""
        assert len(doc) > 40, f"hook {name} needs a docstring"
        for arg in inspect.signature(fn).parameters:
            assert f":param {arg}:" in doc, f"hook {name}: no ':param {arg}:' line"


def test_every_firstresult_hook_says_so_in_the_same_words():
    for name, fn in HOOKS.items():
        firstresult = fn.kefu_spec.get("firstresult", False)
        assert ("Stops at the first non-None result." in (fn.__doc__ or "")) == firstresult, name


def test_every_hook_has_a_test():
    tests = (Path(__file__).parent / "test_hooks.py").read_text()
    for name in HOOKS:
        assert re.search(rf"def test_hook_{name}\b", tests), f"no test_hook_{name} in test_hooks.py"


def test_every_hook_is_called_by_the_dialog_module_only():
    root = Path(hookspecs.__file__).parent
    callers = [p.name for p in root.glob("*.py") if "pm.hook." in p.read_text() or ".hook." in p.read_text()]
    assert callers == ["dialog.py"], callers
