"""One error hierarchy for kefu.

Every error a user can cause derives from :class:`KefuError`, and where a builtin
exception means the same thing, from that builtin too (``KnowledgeError`` is a
``ValueError``), so callers can catch either.  Errors carry what the user must fix:
the file and line for knowledge files, the name for unknown bots.  The server maps
``status_code``/``code`` to HTTP and protocol errors in one place.
"""
from __future__ import annotations


class KefuError(Exception):
    """Root of every kefu error."""

    status_code = 500
    code = "internal"

    def __init__(self, message: str = "", **extra: object) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def __str__(self) -> str:
        return self.message


class ConfigError(KefuError, ValueError):
    """A configuration value is missing or malformed."""

    code = "bad_config"


class InputError(KefuError, ValueError):
    """Text or a request from a visitor, agent or caller is unusable."""

    status_code = 400
    code = "bad_input"


class UnknownBotError(KefuError, LookupError):
    status_code = 404
    code = "unknown_bot"

    def __init__(self, name: str, known: list[str] | tuple[str, ...] = ()) -> None:
        hint = f" (known bots: {', '.join(sorted(known))})" if known else " (no bots are registered)"
        super().__init__(f"unknown bot {name!r}{hint}")
        self.name = name


class KnowledgeError(KefuError, ValueError):
    """A knowledge file is invalid; carries every problem as ``file:line: message``."""

    code = "bad_knowledge"

    def __init__(self, problems: list["Problem"]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class Problem:
    """One problem in one file, printed as ``file:line: message`` like a compiler."""

    __slots__ = ("path", "line", "message")

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path, self.line, self.message = str(path), line, message

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.message}"

    def __repr__(self) -> str:
        return f"Problem({str(self)!r})"


class ModelError(KefuError, ValueError):
    """An intent model folder or training data is unusable; names the file."""

    code = "bad_model"


class PluginError(KefuError):
    """A plugin is broken (misspelt hook, bad registration)."""

    code = "bad_plugin"
