"""Score a model folder on labelled texts and write a report.

Rows labelled ``oos`` are out-of-scope queries.  Metrics (``metrics.json``):

- ``accuracy`` / ``macro_f1``: top-1 over in-scope rows, ignoring the threshold;
- ``in_scope_accuracy``: in-scope rows both correct and accepted (score >= threshold);
- ``oos_recall``: OOS rows rejected (score < threshold); null without OOS rows;
- ``oos_curve``: in-scope accuracy and OOS recall at every threshold (the trade-off);
- ``n``, ``n_in_scope``, ``n_oos``, ``threshold``, ``oos_score``.

Report files: ``metrics.json``, ``per_intent.csv`` (precision/recall/F1/support),
``misclassified.csv``, ``confusion_matrix.png``, ``confidence_histogram.png`` and, with OOS
rows, ``oos_curve.png``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine.onnx_intent import OnnxIntentClassifier

from .data import OOS_LABEL, Dataset

CURVE_POINTS = 101


def compute_metrics(model_labels: Sequence[str], true: Sequence[str], probs: np.ndarray, oos_score: np.ndarray,
                    threshold: float) -> dict[str, Any]:
    from sklearn.metrics import f1_score, precision_recall_fscore_support, roc_auc_score

    true_arr = np.asarray(true)
    is_oos = true_arr == OOS_LABEL
    pred = np.asarray(model_labels)[probs.argmax(1)] if len(true) else np.asarray([], dtype=str)
    correct = pred == true_arr
    ins = ~is_oos
    accepted = oos_score >= threshold
    known = set(model_labels)
    unknown = sorted(set(true_arr[ins].tolist()) - known)
    m: dict[str, Any] = {
        "n": int(len(true_arr)), "n_in_scope": int(ins.sum()), "n_oos": int(is_oos.sum()),
        "threshold": float(threshold),
        "accuracy": float(correct[ins].mean()) if ins.any() else None,
        "macro_f1": None, "in_scope_accuracy": float((correct & accepted)[ins].mean()) if ins.any() else None,
        "in_scope_accept_rate": float(accepted[ins].mean()) if ins.any() else None,
        "oos_recall": float((~accepted[is_oos]).mean()) if is_oos.any() else None,
        "oos_auroc": None, "unknown_labels": unknown, "per_intent": {}, "oos_curve": [],
    }
    if ins.any():
        labels_seen = sorted(set(true_arr[ins].tolist()) | set(pred[ins].tolist()))
        m["macro_f1"] = float(f1_score(true_arr[ins], pred[ins], labels=labels_seen, average="macro", zero_division=0))
        p, r, f, s = precision_recall_fscore_support(true_arr[ins], pred[ins], labels=labels_seen, zero_division=0)
        m["per_intent"] = {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                           for i, lab in enumerate(labels_seen)}
    if is_oos.any() and ins.any():
        m["oos_auroc"] = float(roc_auc_score(is_oos, -oos_score))
        lo, hi = float(oos_score.min()), float(oos_score.max())
        for t in np.linspace(lo, hi, CURVE_POINTS):
            acc = (oos_score >= t)
            m["oos_curve"].append({"threshold": float(t), "in_scope_accuracy": float((correct & acc)[ins].mean()),
                                   "oos_recall": float((~acc[is_oos]).mean())})
    return m


def evaluate(clf: OnnxIntentClassifier, data: Dataset) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    probs, score = clf.scores(list(data.texts))
    return compute_metrics(clf.labels, data.labels, probs, score, clf.threshold), probs, score


def write_report(out_dir: str | Path, data: Dataset, labels: Sequence[str], metrics: dict[str, Any],
                 probs: np.ndarray, score: np.ndarray, extra: dict[str, Any] | None = None) -> Path:
    """Write metrics.json and the report files into ``out_dir``; returns the folder."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = dict(metrics)
    if extra:
        body.update(extra)
    (out / "metrics.json").write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    with (out / "per_intent.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["intent", "precision", "recall", "f1", "support"])
        for lab, v in sorted(metrics["per_intent"].items()):
            w.writerow([lab, f"{v['precision']:.4f}", f"{v['recall']:.4f}", f"{v['f1']:.4f}", v["support"]])

    true = np.asarray(data.labels)
    pred = np.asarray(labels)[probs.argmax(1)]
    conf = probs.max(1)
    accepted = score >= metrics["threshold"]
    is_oos = true == OOS_LABEL
    wrong = ((pred != true) & ~is_oos) | (is_oos & accepted)
    with (out / "misclassified.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "predicted", "confidence", "oos_score", "accepted"])
        for i in np.flatnonzero(wrong)[np.argsort(-conf[wrong])]:
            w.writerow([data.texts[i], true[i], pred[i], f"{conf[i]:.4f}", f"{score[i]:.4f}", bool(accepted[i])])

    ins = ~is_oos
    if ins.any():
        names = sorted(set(true[ins].tolist()) | set(pred[ins].tolist()))
        cm = confusion_matrix(true[ins], pred[ins], labels=names)
        size = min(24, 3 + 0.22 * len(names))
        fig, ax = plt.subplots(figsize=(size, size))
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=max(4, 10 - len(names) // 12))
        ax.set_yticks(range(len(names)), names, fontsize=max(4, 10 - len(names) // 12))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"confusion matrix (accuracy {metrics['accuracy']:.4f})")
        fig.tight_layout()
        fig.savefig(out / "confusion_matrix.png", dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 1, 41)
    ax.hist(conf[ins & (pred == true)], bins=bins, alpha=0.6, label="in scope, correct")
    ax.hist(conf[ins & (pred != true)], bins=bins, alpha=0.6, label="in scope, wrong")
    if is_oos.any():
        ax.hist(conf[is_oos], bins=bins, alpha=0.6, label="out of scope")
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("texts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "confidence_histogram.png", dpi=100)
    plt.close(fig)

    if metrics["oos_curve"]:
        c = metrics["oos_curve"]
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot([p["oos_recall"] for p in c], [p["in_scope_accuracy"] for p in c])
        ax.scatter([metrics["oos_recall"]], [metrics["in_scope_accuracy"]], color="red", label="chosen threshold")
        ax.set_xlabel("OOS recall")
        ax.set_ylabel("in-scope accuracy")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "oos_curve.png", dpi=100)
        plt.close(fig)
    return out


def evaluate_folder(model_dir: str | Path, data: Dataset, report_dir: str | Path | None = None, *,
                    threads: int = 2, model_file: str = "model.onnx") -> dict[str, Any]:
    """Load ``model_dir``, score ``data``, optionally write a report; returns the metrics."""
    clf = OnnxIntentClassifier.load(model_dir, threads=threads, model_file=model_file)
    try:
        metrics, probs, score = evaluate(clf, data)
    finally:
        clf.close()
    metrics["data"] = data.source
    metrics["model"] = str(model_dir)
    if report_dir is not None:
        write_report(report_dir, data, clf.labels, metrics, probs, score)
    return metrics


def summary(metrics: dict[str, Any]) -> str:
    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"
    return (f"n={metrics['n']} (in scope {metrics['n_in_scope']}, oos {metrics['n_oos']})  "
            f"accuracy {pct(metrics['accuracy'])}  macro-F1 {pct(metrics['macro_f1'])}  "
            f"in-scope accuracy {pct(metrics['in_scope_accuracy'])}  OOS recall {pct(metrics['oos_recall'])}  "
            f"threshold {metrics['threshold']:.4f}")
