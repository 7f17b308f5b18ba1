"""The model-free classifier every bot starts with, measured on BANKING77.

Compares the engine's KnowledgeClassifier (TF-IDF word + character n-grams, logistic
regression) with rapidfuzz nearest-example matching, the cheaper alternative, on the
BANKING77 intent benchmark (Casanueva et al., "Efficient Intent Detection with Dual Sentence
Encoders", NLP4ConvAI @ ACL 2020, arXiv:2003.04807; CC BY 4.0), read from
../shared/data/banking77 or $KEFU_BANKING77, never copied into the project.

    python bench/bench_knowledge_classifier.py [--data DIR] [--fewshot 10]

Prints a table and writes bench/results/knowledge-classifier.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rapidfuzz import fuzz, process  # noqa: E402

from engine.knowledge_classifier import KnowledgeClassifier  # noqa: E402
from engine.normalize import normalize  # noqa: E402


def read(path: Path) -> tuple[list[str], list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [normalize(r["text"]) for r in rows], [r["category"] for r in rows]


def sample(texts, labels, per_intent: int, seed: int):
    by: dict[str, list[str]] = {}
    for t, y in zip(texts, labels):
        by.setdefault(y, []).append(t)
    rng = random.Random(seed)
    out_t, out_y = [], []
    for y in sorted(by):
        for t in rng.sample(by[y], min(per_intent, len(by[y]))):
            out_t.append(t)
            out_y.append(y)
    return out_t, out_y


def score_tfidf(train_t, train_y, test_t, test_y) -> dict:
    t0 = time.perf_counter()
    clf = KnowledgeClassifier(train_t, train_y)
    fit_s = time.perf_counter() - t0
    preds = [c.intent for c in clf.predict_batch(test_t, top_k=1)]
    latencies = []
    for text in test_t[:500]:
        t = time.perf_counter()
        clf.predict_batch([text], top_k=1)
        latencies.append((time.perf_counter() - t) * 1000)
    latencies.sort()
    acc = sum(p == y for p, y in zip(preds, test_y)) / len(test_y)
    return {"accuracy": acc, "fit_s": fit_s, "p50_ms": statistics.median(latencies),
            "p99_ms": latencies[int(len(latencies) * 0.99) - 1]}


def score_fuzzy(train_t, train_y, test_t, test_y) -> dict:
    latencies, correct = [], 0
    for text, y in zip(test_t, test_y):
        t = time.perf_counter()
        _, _, index = process.extractOne(text, train_t, scorer=fuzz.token_sort_ratio)
        latencies.append((time.perf_counter() - t) * 1000)
        correct += train_y[index] == y
    latencies.sort()
    return {"accuracy": correct / len(test_y), "fit_s": 0.0, "p50_ms": statistics.median(latencies),
            "p99_ms": latencies[int(len(latencies) * 0.99) - 1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "KEFU_BANKING77", ROOT.parent / "shared" / "data" / "banking77")))
    parser.add_argument("--fewshot", type=int, default=10, help="examples per intent for the few-shot rows")
    args = parser.parse_args()
    if not (args.data / "train.csv").exists():
        print(f"BANKING77 not found under {args.data} (set --data or KEFU_BANKING77)", file=sys.stderr)
        return 2
    train_t, train_y = read(args.data / "train.csv")
    test_t, test_y = read(args.data / "test.csv")
    rows = []
    rows.append(("tfidf+logreg", "full", score_tfidf(train_t, train_y, test_t, test_y)))
    rows.append(("rapidfuzz nearest example", "full", score_fuzzy(train_t, train_y, test_t, test_y)))
    few = [score_tfidf(*sample(train_t, train_y, args.fewshot, seed), test_t, test_y) for seed in range(5)]
    accs = [r["accuracy"] for r in few]
    rows.append(("tfidf+logreg", f"{args.fewshot}-shot x5 seeds",
                 {**few[0], "accuracy": statistics.mean(accs), "accuracy_sd": statistics.stdev(accs)}))
    print(f"{'classifier':28} {'training data':20} {'accuracy':>9} {'fit s':>7} {'p50 ms':>7} {'p99 ms':>7}")
    for name, data, r in rows:
        print(f"{name:28} {data:20} {r['accuracy']*100:8.2f}% {r['fit_s']:7.1f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f}")
    out = ROOT / "bench" / "results" / "knowledge-classifier.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{"classifier": n, "data": d, **r} for n, d, r in rows], indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
