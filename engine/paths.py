"""Where a kefu checkout keeps its knowledge files, trained models and data.

The defaults are the folders beside the installed packages (the project root of an
editable install, which is how the README installs kefu); ``KEFU_KNOWLEDGE_DIR``,
``KEFU_MODELS_DIR`` and ``KEFU_DATA_DIR`` (or the matching config.toml keys, applied
by the caller) move them.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _dir(env: str, default: Path) -> Path:
    value = os.environ.get(env, "").strip()
    return Path(value).expanduser() if value else default


def knowledge_dir() -> Path:
    return _dir("KEFU_KNOWLEDGE_DIR", PROJECT_ROOT / "knowledge")


def models_dir() -> Path:
    return _dir("KEFU_MODELS_DIR", PROJECT_ROOT / "models")


def data_dir() -> Path:
    return _dir("KEFU_DATA_DIR", PROJECT_ROOT / "data")
