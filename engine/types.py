"""Values that flow through a dialog turn.  Frozen so hooks cannot mutate shared state by accident."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

#: Which step of a turn produced the answer; reported by ``kefu ask --json`` and the REST API.
SOURCES = ("model", "keyword", "faq", "fuzzy", "plugin", "fallback", "handoff", "greeting")


@dataclass(frozen=True)
class Message:
    """A visitor's text as received, plus its normalised form for matching."""

    text: str
    bot: str
    session: str = "default"
    normalized: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class IntentScore:
    intent: str
    confidence: float


@dataclass(frozen=True)
class Classification:
    """A classifier's ranked guesses for one text.

    ``in_scope`` is False when the best score falls under the classifier's calibrated
    out-of-scope threshold: the turn then counts as not understood.
    """

    ranked: tuple[IntentScore, ...]
    in_scope: bool
    source: str = "model"
    #: An answer the matcher found along with the intent (a FAQ entry's answer).
    matched_answer: str | None = None

    @property
    def intent(self) -> str | None:
        return self.ranked[0].intent if self.ranked else None

    @property
    def confidence(self) -> float:
        return self.ranked[0].confidence if self.ranked else 0.0


@dataclass(frozen=True)
class Reply:
    text: str
    kind: str = "text"  # text | handoff | greeting; a transport renders unknown kinds as text
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Answer:
    """What the ``answer`` hook returns when it wants to name its source."""

    replies: tuple[Reply, ...]
    source: str = "plugin"


@dataclass(frozen=True)
class Handoff:
    """Why the bot passes the visitor to a person."""

    reason: str  # intent | asked | misunderstood | plugin
    detail: str = ""


@dataclass(frozen=True)
class Turn:
    """Everything a caller learns from one turn; ``as_dict`` is the ``--json``/REST shape."""

    bot: str
    session: str
    text: str
    intent: str | None
    confidence: float
    source: str
    replies: tuple[Reply, ...]
    handoff: Handoff | None = None
    delay_s: float = 0.0
    suggestions: tuple[str, ...] = ()

    @property
    def answer(self) -> str:
        return "\n".join(r.text for r in self.replies)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bot": self.bot,
            "session": self.session,
            "intent": self.intent,
            "confidence": round(float(self.confidence), 4),
            "answer": self.answer,
            "handoff": self.handoff is not None,
            "handoff_reason": self.handoff.reason if self.handoff else None,
            "source": self.source,
            "delay_ms": int(round(self.delay_s * 1000)),
            "suggestions": list(self.suggestions),
        }


@dataclass(frozen=True)
class BotSpec:
    """What a plugin registers: a bot's name, its knowledge file and where its model lives."""

    name: str
    knowledge: Path
    model_dir: Path | None = None
    description: str = ""
