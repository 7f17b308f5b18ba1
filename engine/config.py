"""Configuration: one ``config.toml``, every key overridable by ``KEFU_*`` variables.

Keys live in sections (``[engine]``, ``[server]``, ...); each package declares its
section's defaults (the engine's are :data:`ENGINE_DEFAULTS`), so defaults run with no
file at all.  ``KEFU_<SECTION>_<KEY>`` overrides ``[section] key``; the value is parsed
as the default's type (``true/false``, numbers, comma-separated lists).  Unknown keys
in a file are errors, so a typo does not silently keep a default.
"""
from __future__ import annotations

import copy
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

ENGINE_DEFAULTS: dict[str, Any] = {
    "knowledge_dir": "",         # default: the project's knowledge/ folder
    "models_dir": "",            # default: the project's models/ folder
    "bots": [],                  # bots to load; empty loads every registered bot
    "delays": True,              # humanized reply delays; off in tests and benchmarks
    "memory_max_sessions": 100_000,
    "memory_ttl_s": 3600.0,
    "watch_knowledge": True,     # reload a knowledge file when it changes
    "watch_interval_s": 2.0,
    "use_models": True,          # use models/<bot>/model.onnx when present
    "model_threads": 1,          # ONNX Runtime intra-op threads per model
    "seed": None,                # fixes reply choice and delays, for reproducible demos
}


class Config:
    """Sections of settings, read as ``config["server"]["port"]`` or ``config.get("server.port")``."""

    def __init__(self, sections: Mapping[str, Mapping[str, Any]], source: str = "defaults") -> None:
        self._sections = {name: dict(values) for name, values in sections.items()}
        self.source = source

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self._sections[section]

    def __contains__(self, section: str) -> bool:
        return section in self._sections

    def get(self, dotted: str, default: Any = None) -> Any:
        section, _, key = dotted.partition(".")
        return self._sections.get(section, {}).get(key, default)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return copy.deepcopy(self._sections)


def _coerce(raw: str, default: Any, name: str) -> Any:
    try:
        if isinstance(default, bool):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, list):
            return [part.strip() for part in raw.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {type(default).__name__}") from None
    return raw


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None,
                defaults: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """Defaults, then the file (if any), then ``KEFU_*`` variables."""
    env = os.environ if env is None else env
    sections: dict[str, dict[str, Any]] = {"engine": dict(ENGINE_DEFAULTS)}
    for name, values in (defaults or {}).items():
        sections.setdefault(name, {}).update(copy.deepcopy(dict(values)))
    source = "defaults"
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        for name, values in data.items():
            if name not in sections or not isinstance(values, dict):
                raise ConfigError(f"{path}: unknown section [{name}] (known: {', '.join(sorted(sections))})")
            for key, value in values.items():
                if key not in sections[name]:
                    raise ConfigError(f"{path}: unknown key {key!r} in [{name}]")
                sections[name][key] = value
        source = str(path)
    for name, values in sections.items():
        for key, default in list(values.items()):
            var = f"KEFU_{name}_{key}".upper()
            if var in env:
                values[key] = _coerce(env[var], default if default is not None else "", var)
    return Config(sections, source)
