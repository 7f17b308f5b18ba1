"""The rule a trained model must pass before a bot serves it, and the install that follows.

A bot answers with its knowledge classifier (TF-IDF + logistic regression over the knowledge
file's examples, :mod:`engine.knowledge_classifier`) until it has a model.  A fine-tuned model
is only worth serving when it does better: a base that cannot read the bot's language (all
[UNK] word pieces) trains a model far worse than that baseline, and serving it would make the
bot answer less than it did before training.  So:

* training scores the knowledge classifier on the *same* validation split as the model
  (:func:`baseline_scores`, written to metrics.json as ``baseline``);
* :func:`train_and_install` trains into a staging folder beside the bot's model folder and
  moves it into place (the old folder renamed away first, so a reader never sees half a model)
  only when the model's validation accuracy is at least the baseline's and at least a floor;
  otherwise the staging folder is removed, the bot keeps what it had, and
  :class:`ModelRejected` names both figures;
* :func:`unknown_share` measures how much of the examples the base model's tokenizer cannot
  read, so ``kefu train`` can warn before it spends minutes training.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine.errors import ModelError

from .data import Dataset

#: Accuracy a model must reach whatever the baseline (the knowledge classifier can be weak too).
DEFAULT_MIN_ACCURACY = 0.5
#: Share of [UNK] word pieces in the examples above which ``kefu train`` warns.
UNKNOWN_WARN_SHARE = 0.05


class ModelRejected(ModelError):
    """The trained model did worse than the baseline (or the floor): it was not installed."""

    code = "model_rejected"


def baseline_scores(train: Dataset, val: Dataset, prepare: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Top-1 accuracy on ``val`` of the knowledge classifier fitted on ``train``, texts prepared
    as serving prepares them (``prepare``; default: the engine's normalisation).  A text with no
    known word or n-gram gets no intent from that classifier, and counts as wrong."""
    from engine.knowledge_classifier import KnowledgeClassifier
    from engine.normalize import has_cjk, normalize

    prep = prepare or normalize
    cjk = sum(has_cjk(t) for t in train.texts) * 2 > len(train)
    clf = KnowledgeClassifier([prep(t) for t in train.texts], list(train.labels), cjk=cjk)
    got = clf.predict_batch([prep(t) for t in val.texts], top_k=1)
    correct = sum(1 for c, y in zip(got, val.labels) if c.ranked and c.ranked[0].intent == y)
    return {"classifier": "knowledge (TF-IDF word and character n-grams, logistic regression)",
            "n": len(val), "accuracy": correct / len(val) if len(val) else None}


def unknown_share(tokenizer: Any, texts: list[str]) -> float:
    """Share of the texts' word pieces (special tokens left out) that are the tokenizer's [UNK]."""
    unk = tokenizer.token_to_id("[UNK]")
    special = {tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    total = unknown = 0
    for enc in tokenizer.encode_batch(list(texts)):
        for i, m in zip(enc.ids, enc.attention_mask):
            if m and i not in special:
                total += 1
                unknown += i == unk
    return unknown / total if total else 0.0


@dataclass(frozen=True)
class Verdict:
    install: bool
    reason: str


def judge(result: dict[str, Any], min_accuracy: float = DEFAULT_MIN_ACCURACY) -> Verdict:
    """Whether the model whose metrics.json is ``result`` may be served."""
    model = (result.get("validation") or {}).get("accuracy")
    base = (result.get("baseline") or {}).get("accuracy")
    if model is None:
        return Verdict(True, "no validation split: the model was not compared with the knowledge classifier")
    n = (result.get("validation") or {}).get("n", 0)
    against = f"the knowledge classifier's {base:.4f} on the same {n} validation examples" if base is not None \
        else f"{n} validation examples, no knowledge-classifier figure"
    if model < min_accuracy or (base is not None and model < base):
        floor = f", under the floor {min_accuracy:.2f}" if model < min_accuracy else ""
        return Verdict(False, f"validation accuracy {model:.4f}{floor} against {against}")
    return Verdict(True, f"validation accuracy {model:.4f} against {against}")


def train_and_install(data: Dataset, out: Path, train: Callable[[Path], dict[str, Any]], *,
                      min_accuracy: float = DEFAULT_MIN_ACCURACY, force: bool = False) -> tuple[dict[str, Any], Verdict]:
    """``train(folder)`` writes a complete model folder; it becomes ``out`` only if
    :func:`judge` allows it (or ``force``).  Raises :class:`ModelRejected` otherwise, with
    ``out`` as it was."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.training-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        result = train(staging)
        verdict = judge(result, min_accuracy)
        if not verdict.install and not force:
            keeps = "keeps its current model" if (out / "model.onnx").exists() else \
                "keeps answering with its knowledge classifier"
            raise ModelRejected(f"{data.source}: the trained model was not installed: {verdict.reason}; "
                                f"the bot {keeps} (--force installs it anyway)")
        _swap_in(staging, out)
        return result, verdict
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging`` with renames only: the old folder is moved aside first,
    so ``out`` is always either the whole old model or the whole new one."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
