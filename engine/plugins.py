"""The plugin manager: one per engine, never process-global."""
from __future__ import annotations

import importlib
from typing import Iterable

import pluggy

from . import hookspecs
from .errors import PluginError

hookimpl = pluggy.HookimplMarker("kefu")

#: Built-in behaviour, registered like any plugin (its impls are trylast).
DEFAULT_PLUGINS = ("engine.defaults",)
ENTRY_POINT_GROUP = "kefu.plugins"


def make_plugin_manager(plugins: Iterable[object] = (), load_entrypoints: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("kefu")
    pm.add_hookspecs(hookspecs)
    try:
        for name in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(name), name=name)
        if load_entrypoints:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for plugin in plugins:
            pm.register(plugin)
        # A misspelt hook name would otherwise be silently ignored.
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r}: {exc}") from None
    return pm
