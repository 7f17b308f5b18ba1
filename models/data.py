"""Labelled training data: CSV files (``text,label``) and a bot's knowledge YAML examples.

Every problem raises :class:`engine.errors.ModelError` naming the file (and line for CSV),
so ``kefu train`` tells the user exactly what to fix.
"""
from __future__ import annotations

import csv
import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from engine.errors import KnowledgeError, ModelError
from engine.knowledge import load_knowledge

#: The label of out-of-scope rows in an evaluation file; never a trainable intent.
OOS_LABEL = "oos"


@dataclass(frozen=True)
class Dataset:
    """Parallel tuples of texts and labels, plus where they came from (for error messages)."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ModelError(f"{self.source}: {len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def intents(self) -> tuple[str, ...]:
        """Sorted distinct labels: the model's logit order."""
        return tuple(sorted(set(self.labels)))

    def subset(self, indices: Iterable[int]) -> "Dataset":
        idx = list(indices)
        return Dataset(tuple(self.texts[i] for i in idx), tuple(self.labels[i] for i in idx), self.source)

    def without(self, intents: Iterable[str]) -> "Dataset":
        drop = set(intents)
        return self.subset(i for i, y in enumerate(self.labels) if y not in drop)

    def fingerprint(self) -> str:
        """sha256 of the sorted ``label\\ttext`` lines: the same data in any order gives the same hash."""
        h = hashlib.sha256()
        for label, text in sorted(zip(self.labels, self.texts)):
            h.update(f"{label}\t{text}\n".encode())
        return h.hexdigest()


def load_csv(path: str | Path, *, text_column: str = "text", label_column: str = "label",
             allow_singletons: bool = False) -> Dataset:
    """Read a ``text,label`` CSV (UTF-8, header row, exactly those two columns).

    ``allow_singletons`` is for evaluation files: training needs at least two examples
    per intent (one may go to the validation split), evaluation does not.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such data file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ModelError(f"{path}: not a readable UTF-8 CSV file ({e})") from e
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise ModelError(f"{path}: the file is empty; expected a header row '{text_column},{label_column}'")
    header = [h.strip() for h in rows[0]]
    expected = [text_column, label_column]
    missing = [c for c in expected if c not in header]
    if missing:
        raise ModelError(f"{path}:1: missing column(s) {', '.join(missing)}; the header must be "
                         f"'{text_column},{label_column}' (found {','.join(header) or 'nothing'})")
    extra = [c for c in header if c not in expected]
    if extra:
        raise ModelError(f"{path}:1: unexpected column(s) {', '.join(extra)}; "
                         f"the header must be exactly '{text_column},{label_column}'")
    ti, li = header.index(text_column), header.index(label_column)
    texts, labels = [], []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ModelError(f"{path}:{n}: expected {len(header)} fields, found {len(row)} "
                             "(quote texts that contain commas)")
        text, label = row[ti].strip(), row[li].strip()
        if not text:
            raise ModelError(f"{path}:{n}: empty text")
        if not label:
            raise ModelError(f"{path}:{n}: empty label")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise ModelError(f"{path}: the file has a header but no rows")
    data = Dataset(tuple(texts), tuple(labels), str(path))
    if not allow_singletons:
        check_trainable(data)
    return data


def load_knowledge_examples(path: str | Path) -> Dataset:
    """The examples of a bot's knowledge YAML, read by the engine's own loader, so training
    sees exactly what the bot serves (intents without examples are not model intents).
    Every problem of the file is reported as ``file:line: message``."""
    try:
        knowledge = load_knowledge(path)
    except KnowledgeError as e:
        raise ModelError(str(e)) from None
    pairs = [(text.strip(), intent) for text, intent in knowledge.examples() if text.strip()]
    if not pairs:
        raise ModelError(f"{path}: no intent has examples; nothing to train on")
    data = Dataset(tuple(t for t, _ in pairs), tuple(i for _, i in pairs), str(path))
    check_trainable(data)
    return data


def check_trainable(data: Dataset) -> None:
    """At least two intents, each with at least two examples, and no intent named ``oos``."""
    counts = Counter(data.labels)
    if OOS_LABEL in counts:
        raise ModelError(f"{data.source}: label {OOS_LABEL!r} is reserved for out-of-scope rows in "
                         "evaluation files; remove those rows from training data")
    if len(counts) < 2:
        raise ModelError(f"{data.source}: found {len(counts)} intent(s); a classifier needs at least two")
    single = sorted(label for label, c in counts.items() if c < 2)
    if single:
        shown = ", ".join(single[:10]) + (" ..." if len(single) > 10 else "")
        raise ModelError(f"{data.source}: intent(s) with a single example: {shown}; "
                         "give every intent at least two examples")


def stratified_split(data: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out about ``val_fraction`` of each intent (at least one example of every intent
    with three or more, none of an intent with two) for validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, y in enumerate(data.labels):
        by_label.setdefault(y, []).append(i)
    train_idx, val_idx = [], []
    for label in sorted(by_label):
        idx = by_label[label]
        rng.shuffle(idx)
        k = 0 if val_fraction == 0 or len(idx) < 3 else max(1, round(len(idx) * val_fraction))
        val_idx += idx[:k]
        train_idx += idx[k:]
    return data.subset(sorted(train_idx)), data.subset(sorted(val_idx))


def sample_per_intent(data: Dataset, k: int, seed: int) -> Dataset:
    """Keep ``k`` random examples of each intent (few-shot protocols)."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, y in enumerate(data.labels):
        by_label.setdefault(y, []).append(i)
    keep: list[int] = []
    for label in sorted(by_label):
        idx = sorted(by_label[label])
        keep += rng.sample(idx, min(k, len(idx)))
    return data.subset(sorted(keep))


def tiny_dataset(per_intent: int = 8, seed: int = 0) -> Dataset:
    """A small synthetic shop dataset (4 intents) for tests and the notebooks' quick mode."""
    rng = random.Random(seed)
    templates = {
        "order/status": ["where is my order {}", "has my parcel {} shipped yet", "track order {} please",
                         "when will order {} arrive", "my package {} is late", "delivery status of {}"],
        "refund": ["i want my money back for {}", "refund order {}", "how do i get a refund for {}",
                   "can you reimburse {}", "return {} and get refund", "refund please {}"],
        "human_agent": ["talk to a person about {}", "i need a human {}", "connect me to an agent {}",
                        "real person please {}", "let me speak to staff {}", "agent now {}"],
        "opening_hours": ["when are you open {}", "opening hours {}", "what time do you close {}",
                          "are you open on sunday {}", "business hours {}", "open today {}"],
    }
    fillers = ["", "now", "today", "123", "a1b2", "thanks", "asap", "please", "x9"]
    texts, labels = [], []
    for label, forms in templates.items():
        for i in range(per_intent):
            texts.append(forms[i % len(forms)].format(rng.choice(fillers)).strip())
            labels.append(label)
    return Dataset(tuple(texts), tuple(labels), "<tiny>")


def write_csv(data: Dataset, path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(data.texts, data.labels))
    return path

