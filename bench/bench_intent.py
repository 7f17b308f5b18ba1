"""Intent-model benchmark on BANKING77 (Casanueva et al., "Efficient Intent Detection with Dual
Sentence Encoders", NLP4ConvAI @ ACL 2020, arXiv:2003.04807; CC BY 4.0).

The data is read from its folder (default ../shared/data/banking77, or $KEFU_BANKING77), never
copied into the project.  Protocols (docs/model.md):

- full:    train on train.csv (the pipeline carves its validation split from it), report int8
           and fp32 test accuracy / macro-F1, model size, training time, and speed:
           single-query p50/p99 latency on one thread (tokenisation and scoring included),
           batched queries/s on two threads.
- heldout: the 10 intents in HELDOUT are removed from training; their test queries are labelled
           oos; in-scope accuracy (correct and accepted) and OOS recall at the calibrated threshold.
- fewshot: 10 training examples per intent, seeds 0-4; mean and spread of test accuracy.
- speed:   only the speed measurements, on an existing model folder (--model).

Prints a table and writes JSON to bench/results/intent-<protocol>-<time>.json.
Settings come from the validation split carved from train; test.csv is only scored.

    python bench/bench_intent.py --protocol full
    python bench/bench_intent.py --protocol all
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.onnx_intent import OnnxIntentClassifier  # noqa: E402
from models.data import OOS_LABEL, Dataset, check_trainable, load_csv, sample_per_intent  # noqa: E402
from models.evaluate import compute_metrics  # noqa: E402

#: Removed from training in the held-out-intent protocol (every 8th intent in sorted order).
HELDOUT = ("Refund_not_showing_up", "beneficiary_not_allowed", "card_payment_fee_charged",
           "contactless_not_working", "exchange_charge", "getting_spare_card", "pending_top_up",
           "top_up_by_bank_transfer_charge", "transfer_fee_charged", "virtual_card_not_working")
FEWSHOT_SEEDS = (0, 1, 2, 3, 4)
RESULTS = ROOT / "bench" / "results"


def default_data_dir() -> Path:
    return Path(os.environ.get("KEFU_BANKING77", ROOT.parent / "shared" / "data" / "banking77"))


def read_banking(path: Path) -> Dataset:
    """BANKING77's CSVs have the columns ``text,category``."""
    return load_csv(path, label_column="category", allow_singletons=True)


def score(model_dir: Path, data: Dataset, model_file: str = "model.onnx", threads: int = 2) -> dict:
    clf = OnnxIntentClassifier.load(model_dir, threads=threads, model_file=model_file)
    try:
        probs, oos = clf.scores(list(data.texts))
        return compute_metrics(clf.labels, data.labels, probs, oos, clf.threshold)
    finally:
        clf.close()


def host_probe() -> dict:
    """How fast this host runs right now, recorded beside every speed figure.

    The development machine is a shared 2-core VM whose speed has varied about twofold between
    sessions with nothing else running on it.  Two probes, because they disagreed: a fixed
    pure-Python loop (one core, no library in the way) read as fast on 2026-12-03 as on a fast
    day while the model ran at half speed; the int8 matrix product, run by ONNX Runtime on one
    thread at a served query's shape, measures the vector units the model actually uses.
    """
    loops = []
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        for i in range(10_000_000):
            total += i
        loops.append(time.perf_counter() - t0)
    return {"python_loop_1e7_seconds": min(loops), "load_average_1m": os.getloadavg()[0],
            "cpu_count": os.cpu_count(), "ort_int8_matmul_gops": ort_int8_matmul_gops()}


def ort_int8_matmul_gops(rows: int = 16, inner: int = 384, cols: int = 1536, runs: int = 2000) -> float:
    """Billions of int8 multiply-adds x 2 a second for ONNX Runtime's MatMulInteger on one
    thread: a [rows, inner] x [inner, cols] product, MiniLM's feed-forward layer for a query of
    16 tokens (the served model's own kernels, without the model).  Best of three."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-127, 128, (inner, cols), dtype=np.int8), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [rows, inner])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [rows, cols])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"x": rng.integers(0, 256, (rows, inner), dtype=np.uint8)}
    for _ in range(100):
        session.run(None, feed)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(runs):
            session.run(None, feed)
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * inner * cols * runs / best / 1e9


def speed(model_dir: Path, texts: list[str], n_single: int = 1000) -> dict:
    probe = host_probe()
    one = OnnxIntentClassifier.load(model_dir, threads=1)
    sample = texts[:n_single]
    for t in sample[:50]:
        one.predict_batch([t])
    lat = []
    for t in sample:
        t0 = time.perf_counter()
        one.predict_batch([t])
        lat.append((time.perf_counter() - t0) * 1000)
    one.close()
    two = OnnxIntentClassifier.load(model_dir, threads=2)
    two.predict_batch(texts[:256])
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        two.predict_batch(texts)
        runs.append(len(texts) / (time.perf_counter() - t0))
    two.close()
    return {"single_p50_ms": float(np.percentile(lat, 50)), "single_p99_ms": float(np.percentile(lat, 99)),
            "single_mean_ms": float(np.mean(lat)), "n_single": len(sample),
            "batched_qps_2threads": float(max(runs)), "batched_qps_runs": runs, "n_batched": len(texts),
            "host_probe": probe}


def train(data: Dataset, out: Path, args: argparse.Namespace, *, seed: int = 0, epochs: int | None = None,
          keep_fp32: bool = True, recipe: dict | None = None) -> dict:
    """The pipeline with its defaults, or with ``recipe``'s TrainConfig fields (bench/sweep_intent.py)."""
    from models.pipeline import train_model
    from models.train import TrainConfig

    fields = {"epochs": epochs or args.epochs, **(recipe or {})}
    config = TrainConfig(seed=seed, threads=args.threads, progress=not args.quiet, device=args.device, **fields)
    return train_model(data, out, config, keep_fp32=keep_fp32)


def protocol_full(train_data: Dataset, test: Dataset, args: argparse.Namespace) -> dict:
    out = args.work / "full"
    t0 = time.perf_counter()
    trained = train(train_data, out, args, seed=args.seed, recipe=args.recipe)
    int8 = score(out, test)
    fp32 = score(out, test, "model.fp32.onnx")
    res = {"train_seconds": trained["train_seconds"], "pipeline_seconds": time.perf_counter() - t0,
           "best_epoch": trained["best_epoch"], "epochs": len(trained["history"]),
           "recipe": args.recipe, "soup": trained.get("soup"),
           "calibration": trained["calibration"], "validation": trained.get("validation"),
           "int8": {k: int8[k] for k in ("accuracy", "macro_f1", "n")},
           "fp32": {k: fp32[k] for k in ("accuracy", "macro_f1", "n")},
           "int8_minus_fp32_points": 100 * (int8["accuracy"] - fp32["accuracy"]),
           "model_bytes": (out / "model.onnx").stat().st_size,
           "folder_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file() and p.name != "model.fp32.onnx")}
    if not args.skip_speed:
        res["speed"] = speed(out, list(test.texts))
    return res


def protocol_heldout(train_data: Dataset, test: Dataset, args: argparse.Namespace) -> dict:
    out = args.work / "heldout"
    missing = set(HELDOUT) - set(train_data.labels)
    if missing:
        raise SystemExit(f"held-out intents missing from the data: {sorted(missing)}")
    trained = train(train_data.without(HELDOUT), out, args, seed=args.seed, keep_fp32=False,
                    recipe=args.recipe)
    labels = tuple(OOS_LABEL if y in HELDOUT else y for y in test.labels)
    m = score(out, Dataset(test.texts, labels, test.source))
    return {"heldout_intents": list(HELDOUT), "calibration": trained["calibration"],
            "train_seconds": trained["train_seconds"],
            **{k: m[k] for k in ("n", "n_in_scope", "n_oos", "threshold", "accuracy", "macro_f1",
                                 "in_scope_accuracy", "in_scope_accept_rate", "oos_recall", "oos_auroc")},
            "oos_curve": m["oos_curve"]}


def protocol_fewshot(train_data: Dataset, test: Dataset, args: argparse.Namespace) -> dict:
    runs = []
    for seed in args.fewshot_seeds:
        sub = sample_per_intent(train_data, args.shots, seed)
        check_trainable(sub)
        out = args.work / f"fewshot-{seed}"
        trained = train(sub, out, args, seed=seed, epochs=args.fewshot_epochs, keep_fp32=False,
                        recipe=args.fewshot_recipe)
        m = score(out, test)
        runs.append({"seed": seed, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                     "train_seconds": trained["train_seconds"], "best_epoch": trained["best_epoch"]})
        print(f"  few-shot seed {seed}: accuracy {m['accuracy']:.4f}", flush=True)
    return fewshot_summary(runs, args.shots, args.fewshot_recipe)


def fewshot_summary(runs: list[dict], shots: int, recipe: dict | None) -> dict:
    """Mean, spread and range of test accuracy over the few-shot runs (one per seed)."""
    accs = [r["accuracy"] for r in runs]
    return {"shots": shots, "seeds": [r["seed"] for r in runs], "runs": runs, "recipe": recipe,
            "accuracy_mean": statistics.mean(accs), "accuracy_stdev": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "accuracy_min": min(accs), "accuracy_max": max(accs)}


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def table(results: dict) -> str:
    rows = []
    if "full" in results:
        f = results["full"]
        rows += [("int8 test accuracy", f"{100 * f['int8']['accuracy']:.2f}%"),
                 ("int8 test macro-F1", f"{100 * f['int8']['macro_f1']:.2f}%"),
                 ("fp32 test accuracy", f"{100 * f['fp32']['accuracy']:.2f}%"),
                 ("int8 - fp32", f"{f['int8_minus_fp32_points']:+.2f} points"),
                 ("model.onnx size", f"{f['model_bytes'] / 1e6:.1f} MB"),
                 ("training time", f"{f['train_seconds']:.0f} s ({f['epochs']} epochs, best {f['best_epoch']})")]
    s = results.get("speed") or results.get("full", {}).get("speed")
    if s:
        rows += [("single query p50 / p99 (1 thread)", f"{s['single_p50_ms']:.2f} / {s['single_p99_ms']:.2f} ms"),
                 ("batched throughput (2 threads)", f"{s['batched_qps_2threads']:.0f} queries/s")]
        if "host_probe" in s:
            hp = s["host_probe"]
            rows.append(("host probe (Python loop of 1e7; load)",
                         f"{hp['python_loop_1e7_seconds']:.2f} s; {hp['load_average_1m']:.2f}"))
            if "ort_int8_matmul_gops" in hp:      # recorded since 2026-12-03
                rows.append(("host probe (int8 matmul, 1 thread)", f"{hp['ort_int8_matmul_gops']:.0f} GOPS"))
    if "heldout" in results:
        h = results["heldout"]
        rows += [("held-out: in-scope accuracy", pct(h["in_scope_accuracy"])),
                 ("held-out: OOS recall", pct(h["oos_recall"])),
                 ("held-out: OOS AUROC", "-" if h["oos_auroc"] is None else f"{h['oos_auroc']:.4f}")]
    if "fewshot" in results:
        w = results["fewshot"]
        rows.append((f"{w['shots']}-shot accuracy ({len(w['seeds'])} seeds)",
                     f"{100 * w['accuracy_mean']:.2f}% ± {100 * w['accuracy_stdev']:.2f} "
                     f"(min {100 * w['accuracy_min']:.2f}, max {100 * w['accuracy_max']:.2f})"))
    width = max(len(r[0]) for r in rows) if rows else 0
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=("full", "heldout", "fewshot", "speed", "all"), default="all")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--work", type=Path, default=RESULTS / "models", help="where trained models go")
    p.add_argument("--model", type=Path, help="model folder for --protocol speed (default: <work>/full)")
    p.add_argument("--epochs", type=int, help="epochs for full/heldout (default: the pipeline's auto rule)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch training threads (default: all)")
    p.add_argument("--device", default="cpu", help="torch training device, e.g. cuda (export and scoring stay on CPU)")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--fewshot-seeds", type=int, nargs="+", default=list(FEWSHOT_SEEDS))
    p.add_argument("--fewshot-epochs", type=int, default=20)
    p.add_argument("--recipe", type=json.loads, help="JSON TrainConfig fields for full/heldout, e.g. the one "
                   "bench/sweep_intent.py chose (default: the pipeline's defaults)")
    p.add_argument("--fewshot-recipe", type=json.loads, help="JSON TrainConfig fields for fewshot")
    p.add_argument("--skip-speed", action="store_true", help="no speed measurements in --protocol full "
                   "(training on a lent GPU machine: measure speed where the model serves)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", type=Path, help="JSON results file (default: bench/results/intent-<protocol>-<time>.json; "
                   "name one per process when several run side by side)")
    args = p.parse_args(argv)

    train_data = read_banking(args.data_dir / "train.csv")
    test = read_banking(args.data_dir / "test.csv")
    args.work.mkdir(parents=True, exist_ok=True)
    protocols = ("full", "heldout", "fewshot") if args.protocol == "all" else (args.protocol,)
    results: dict = {"dataset": "BANKING77 (Casanueva et al. 2020)", "n_train": len(train_data), "n_test": len(test),
                     "cpu_count": os.cpu_count()}
    for name in protocols:
        print(f"== {name}", flush=True)
        if name == "speed":
            results["speed"] = speed(args.model or args.work / "full", list(test.texts))
        else:
            results[name] = globals()[f"protocol_{name}"](train_data, test, args)
        path = args.out or RESULTS / f"intent-{args.protocol}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
