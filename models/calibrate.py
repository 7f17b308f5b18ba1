"""Serving-time scores, chosen on held-out data: the kNN prototype bank, the kNN mix and the
out-of-scope threshold.  numpy only, on the int8 model's own outputs (what serving sees).

Out-of-scope threshold, the "stand-in OOS" method (docs/model.md): the validation intents
are split into ``folds`` groups; for each group, its validation texts play unseen intents
(their prototypes are removed from the bank and their logits from the softmax) while the
other validation texts stay in scope.  Pooled over the groups, the threshold maximises
in-scope accuracy (correct *and* accepted) plus OOS recall (rejected).

The score is ``knn_cosine`` (best cosine to a prototype) unless asked otherwise; the
stand-in figures of ``max_prob`` (best confidence) are reported beside it but do not pick
the score: the head was trained on the stand-in intents, which flatters ``max_prob`` (on
BANKING77's held-out intents it did worse, docs/model.md).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from engine.onnx_intent import OOS_SCORES, combine_scores, knn_label_scores, starts_of

MIX_GRID = (0.0, 0.25, 0.5, 0.75)
TEMPERATURE = 0.05


def build_bank(emb: np.ndarray, labels: Sequence[str], order: Sequence[str], max_per_label: int,
               seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Prototype embeddings grouped by label (in ``order``): every example of a label with at
    most ``max_per_label`` examples, else that many k-means centroids (re-normalised).  A small
    bank keeps the per-query cost of the kNN scores at a few microseconds."""
    from sklearn.cluster import KMeans

    labels_arr = np.asarray(labels)
    rows, counts = [], []
    for label in order:
        e = emb[labels_arr == label]
        if len(e) > max_per_label:
            km = KMeans(n_clusters=max_per_label, n_init=1, random_state=seed).fit(e)
            e = km.cluster_centers_
            e = e / np.linalg.norm(e, axis=1, keepdims=True).clip(min=1e-12)
        rows.append(e.astype(np.float32))
        counts.append(len(e))
    return np.concatenate(rows), counts



@dataclass
class Calibration:
    mix: float
    temperature: float
    oos_score: str
    threshold: float
    method: str
    val_accuracy_by_mix: dict[str, float] = field(default_factory=dict)
    standin: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def choose_mix(logits: np.ndarray, knn: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, float]]:
    """The kNN mix with the best validation accuracy (the smallest on ties)."""
    accs = {}
    for mix in MIX_GRID:
        probs, _ = combine_scores(logits, knn, mix=mix, temperature=TEMPERATURE, oos_score="max_prob")
        accs[str(mix)] = float((probs.argmax(1) == y).mean())
    best = max(MIX_GRID, key=lambda m: (accs[str(m)], -m))
    return best, accs


def best_threshold(in_scores: np.ndarray, in_correct: np.ndarray, oos_scores: np.ndarray) -> tuple[float, float, float]:
    """Threshold maximising in-scope accuracy + OOS recall; returns (threshold, in-scope acc, OOS recall)."""
    cands = np.unique(np.concatenate([in_scores, oos_scores]))
    cands = np.concatenate([[-np.inf], cands])
    in_acc = np.array([(in_correct & (in_scores >= t)).mean() for t in cands])
    oos_rec = np.array([(oos_scores < t).mean() for t in cands])
    i = int(np.argmax(in_acc + oos_rec))
    t = float(cands[i]) if np.isfinite(cands[i]) else 0.0
    return t, float(in_acc[i]), float(oos_rec[i])


def standin_scores(logits: np.ndarray, emb: np.ndarray, y: np.ndarray, bank: np.ndarray,
                   counts: Sequence[int], *, mix: float, folds: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Per score kind: pooled in-scope scores/correctness and stand-in OOS scores over the folds."""
    n_labels = logits.shape[1]
    present = sorted(set(y.tolist()))
    rng = random.Random(seed)
    rng.shuffle(present)
    groups = [present[i::folds] for i in range(folds)]
    bank_label = np.repeat(np.arange(n_labels), counts)
    out = {k: {"in": [], "correct": [], "oos": []} for k in OOS_SCORES}
    for group in groups:
        held = np.isin(np.arange(n_labels), group)
        keep = np.flatnonzero(~held)
        sub_bank_rows = ~held[bank_label]
        sub_counts = [counts[i] for i in keep]
        knn = knn_label_scores(emb, bank[sub_bank_rows], starts_of(sub_counts))
        sub_logits = logits[:, keep]
        is_oos = np.isin(y, group)
        for kind in OOS_SCORES:
            probs, score = combine_scores(sub_logits, knn, mix=mix, temperature=TEMPERATURE, oos_score=kind)
            pred = keep[probs.argmax(1)]
            out[kind]["in"].append(score[~is_oos])
            out[kind]["correct"].append(pred[~is_oos] == y[~is_oos])
            out[kind]["oos"].append(score[is_oos])
    return {k: {name: np.concatenate(v[name]) for name in v} for k, v in out.items()}


def calibrate(logits: np.ndarray, emb: np.ndarray, y: np.ndarray, bank: np.ndarray, counts: Sequence[int],
              *, folds: int = 5, seed: int = 0, oos_score: str = "knn_cosine") -> Calibration:
    """Choose mix, score kind and threshold on validation outputs (``y``: label indices)."""
    knn = knn_label_scores(emb, bank, starts_of(counts))
    mix, accs = choose_mix(logits, knn, y)
    n_intents = len(set(y.tolist()))
    folds = min(folds, n_intents)
    if folds < 2 or n_intents < 3:
        return Calibration(mix, TEMPERATURE, oos_score, 0.0,
                           "none: fewer than 3 intents in the validation split; every text is in scope",
                           accs)
    pooled = standin_scores(logits, emb, y, bank, counts, mix=mix, folds=folds, seed=seed)
    results = {}
    for kind in OOS_SCORES:
        p = pooled[kind]
        t, in_acc, oos_rec = best_threshold(p["in"], p["correct"], p["oos"])
        results[kind] = {"threshold": t, "in_scope_accuracy": in_acc, "oos_recall": oos_rec,
                         "n_in": int(len(p["in"])), "n_oos": int(len(p["oos"]))}
    kind = oos_score
    return Calibration(mix, TEMPERATURE, kind, results[kind]["threshold"],
                       f"stand-in OOS: {folds} folds of validation intents held out of the bank and softmax; "
                       "threshold maximising in-scope accuracy + OOS recall", accs, results)
