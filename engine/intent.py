"""The intent-classifier interface every classifier implements.

Two implementations ship: :class:`engine.knowledge_classifier.KnowledgeClassifier`
(TF-IDF + logistic regression over a bot's knowledge examples, so every bot works with
no model) and the ONNX Runtime model in :mod:`engine.onnx_intent` (a fine-tuned BERT
exported by ``kefu train``).  The dialog engine only sees this interface.
"""
from __future__ import annotations

import abc
import asyncio
from typing import Sequence

from .types import Classification


class IntentClassifier(abc.ABC):
    """Maps texts to ranked intents.

    ``predict_batch`` is synchronous, thread-safe and may release the GIL; ``classify``
    is what the event loop calls and must never block it.
    """

    #: Shown in ``kefu ask --json`` as the step's source.
    source: str = "model"
    #: Labels in the classifier's own order.
    labels: tuple[str, ...] = ()
    #: Best-score threshold under which a turn counts as not understood (out of scope).
    threshold: float = 0.0

    @abc.abstractmethod
    def predict_batch(self, texts: Sequence[str], top_k: int = 3) -> list[Classification]:
        """Classify several texts at once (synchronous)."""

    async def classify(self, text: str, top_k: int = 3) -> Classification:
        """Classify one text off the event loop; implementations may batch concurrent calls."""
        (result,) = await asyncio.to_thread(self.predict_batch, [text], top_k)
        return result

    def close(self) -> None:
        """Release threads or sessions; the default holds none."""
