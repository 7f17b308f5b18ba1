"""Which out-of-scope score separates unseen intents best, on a held-out-intent model.

A research probe for the held-out-intent protocol (docs/model.md), not a serving feature: it takes
the model `bench/bench_intent.py --protocol heldout` trained (10 intents removed from training),
embeds that model's own training texts with its int8 export, and compares on BANKING77's test
set (the removed intents' queries labelled oos):

- ``knn_cosine``: what serving uses, the best cosine to the prototype bank (bank.npy);
- ``max_prob``: the top confidence;
- ``mahalanobis``: minus the smallest Mahalanobis distance to a class mean, with one covariance
  shared by all classes (Lee et al. 2018), fitted on the training embeddings;
- ``relative_mahalanobis``: the same minus the distance to one Gaussian over all training
  embeddings (Ren et al. 2021), which discounts directions every class varies in.

For each score: AUROC, and the best in-scope accuracy (correct and accepted) at OOS recall of at
least 50/60/70/80 % over every threshold. These are oracle thresholds, read off test: they
compare scores, they are not a protocol figure (the protocol's threshold is chosen on validation).

    python bench/probe_oos_scores.py --model bench/results/models/heldout
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))   # bench_intent, however this script is loaded

from bench_intent import HELDOUT, RESULTS, default_data_dir, read_banking  # noqa: E402
from engine.onnx_intent import OnnxIntentClassifier  # noqa: E402
from models.data import OOS_LABEL  # noqa: E402
from models.evaluate import compute_metrics  # noqa: E402

RECALLS = (0.5, 0.6, 0.7, 0.8)


def fit_gaussians(emb: np.ndarray, labels: np.ndarray, order: list[str], shrink: float = 1e-3):
    """Class means and the inverse of their shared covariance; also one Gaussian over everything."""
    means = np.stack([emb[labels == lab].mean(0) for lab in order])
    index = {lab: i for i, lab in enumerate(order)}
    centred = emb - means[[index[y] for y in labels]]
    d = emb.shape[1]

    def inverse(cov: np.ndarray) -> np.ndarray:
        # A little shrinkage towards the mean variance: the covariance of a few thousand
        # 384-dimensional points is near singular in the directions fine-tuning collapsed.
        cov = (1 - shrink) * cov + shrink * np.trace(cov) / d * np.eye(d)
        return np.linalg.inv(cov)

    shared = inverse(centred.T @ centred / len(emb))
    mean0 = emb.mean(0)
    background = inverse(np.cov(emb, rowvar=False, bias=True))
    return means, shared, mean0, background


def mahalanobis(x: np.ndarray, means: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """Squared distances, rows = x, columns = means."""
    xa = np.einsum("nd,de,ne->n", x, inv, x)[:, None]
    ma = np.einsum("kd,de,ke->k", means, inv, means)[None, :]
    return xa - 2 * x @ inv @ means.T + ma


def best_in_scope_at(score: np.ndarray, correct: np.ndarray, is_oos: np.ndarray, recall: float) -> float:
    """Highest in-scope accuracy over thresholds whose OOS recall is at least ``recall``."""
    best = 0.0
    ins = ~is_oos
    for t in np.unique(score):
        accepted = score >= t
        if (~accepted[is_oos]).mean() >= recall:
            best = max(best, float((correct & accepted)[ins].mean()))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=RESULTS / "models" / "heldout")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    train = read_banking(args.data_dir / "train.csv").without(HELDOUT)
    test = read_banking(args.data_dir / "test.csv")
    true = np.array([OOS_LABEL if y in HELDOUT else y for y in test.labels])
    is_oos = true == OOS_LABEL

    clf = OnnxIntentClassifier.load(args.model, threads=2)
    t0 = time.perf_counter()
    test_logits, test_emb = clf.encode(list(test.texts))
    probs, served = clf.scores_of(test_logits, test_emb)
    _, train_emb = clf.encode(list(train.texts))
    labels = list(clf.labels)
    clf.close()
    embed_seconds = time.perf_counter() - t0

    trained_labels = set(train.labels)
    trained = [lab for lab in labels if lab in trained_labels]   # all of them for a held-out model
    means, shared, mean0, background = fit_gaussians(train_emb, np.asarray(train.labels), trained)
    md = mahalanobis(test_emb, means, shared)
    md0 = mahalanobis(test_emb, mean0[None, :], background)
    scores = {clf.oos_score: served,   # knn_cosine for a model kefu trains; max_prob repeats it otherwise
              "max_prob": probs.max(1),
              "mahalanobis": -md.min(1),
              "relative_mahalanobis": -(md - md0).min(1)}
    pred = np.asarray(labels)[probs.argmax(1)]
    correct = pred == true
    rows = {}
    for name, s in scores.items():
        m = compute_metrics(labels, true, probs, s, float(s.min()))
        rows[name] = {"auroc": m["oos_auroc"],
                      "best_in_scope_at_recall": {f"{r:.2f}": best_in_scope_at(s, correct, is_oos, r)
                                                  for r in RECALLS}}
    closed = float(correct[~is_oos].mean())
    result = {"model": str(args.model), "n_in_scope": int((~is_oos).sum()), "n_oos": int(is_oos.sum()),
              "closed_set_accuracy": closed, "embed_seconds": embed_seconds, "scores": rows}

    print(f"closed-set accuracy on in-scope queries: {100 * closed:.2f}%  "
          f"({result['n_in_scope']} in scope, {result['n_oos']} oos)")
    head = "score".ljust(22) + "AUROC   " + "  ".join(f"in-scope@{int(100 * r)}%" for r in RECALLS)
    print(head)
    for name, r in rows.items():
        cells = "  ".join(f"{100 * v:>13.2f}" for v in r["best_in_scope_at_recall"].values())
        print(f"{name:<22}{r['auroc']:.4f}  {cells}")
    out = args.out or RESULTS / f"oos-scores-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
