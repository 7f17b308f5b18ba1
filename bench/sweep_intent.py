"""Choose the intent model's training recipe on BANKING77's *train* split alone, then run the
benchmark's protocols (bench/bench_intent.py) with the recipes chosen.

Nothing here reads test.csv until the recipes are fixed:

- full-data recipes are scored on validation splits carved from train.csv exactly as the
  pipeline carves them (10 % of each intent, split seeds 0 and 1); a recipe's score is the mean
  over the two splits of its best-epoch validation accuracy;
- few-shot recipes are trained on 10 examples per intent drawn from train.csv with dev seeds
  (100, 101: not the benchmark's seeds 0-4) and scored on 20 other train.csv examples per intent.

The recipe with the best mean wins (a smaller validation loss breaks ties); then the
``full``, ``heldout`` and ``fewshot`` protocols run with it and score test.csv once.
Training runs on ``--device`` (a GPU makes the sweep take minutes instead of a day on two
cores); export, int8 quantisation and scoring always run on the CPU with ONNX Runtime.

    python bench/sweep_intent.py --device cuda --workers 16 --skip-speed          # round 1
    python bench/sweep_intent.py --device cuda --workers 16 --skip-speed --protocols full,fewshot \
        --full-recipe '{"lr": 2e-4, "layer_decay": 0.9, "epochs": 15}' --few-recipes round2
    python bench/sweep_intent.py --only sweep          # recipes only, no test scoring

Prints a table and writes bench/results/sweep-intent-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

#: Full-data recipes (TrainConfig fields).  The first is the pipeline's default.
FULL_RECIPES = (
    {},
    {"lr": 2e-4, "epochs": 10},
    {"lr": 2e-4, "epochs": 15},
    {"lr": 3e-4, "layer_decay": 0.8, "epochs": 15},
    {"lr": 2e-4, "layer_decay": 0.9, "epochs": 15},
    {"lr": 2e-4, "epochs": 15, "label_smoothing": 0.2},
)
#: Few-shot recipes.  The first is the pipeline's default (a validation split, the step rule,
#: best epoch); the others train on every example for a fixed number of epochs.
FEW_RECIPES = (
    {},
    {"val_fraction": 0.0, "epochs": 40},
    {"val_fraction": 0.0, "epochs": 40, "lr": 2e-4},
    {"val_fraction": 0.0, "epochs": 40, "lr": 3e-4},
    {"val_fraction": 0.0, "epochs": 60, "lr": 2e-4},
    {"val_fraction": 0.0, "epochs": 40, "lr": 5e-4, "layer_decay": 0.8},
)
#: Round 2 of the few-shot sweep (docs/model.md): around round 1's best, higher rates.
FEW_RECIPES_ROUND2 = (
    {"val_fraction": 0.0, "epochs": 40, "lr": 5e-4, "layer_decay": 0.8},
    {"val_fraction": 0.0, "epochs": 40, "lr": 8e-4, "layer_decay": 0.8},
    {"val_fraction": 0.0, "epochs": 40, "lr": 1e-3, "layer_decay": 0.7},
    {"val_fraction": 0.0, "epochs": 60, "lr": 5e-4, "layer_decay": 0.8},
    {"val_fraction": 0.0, "epochs": 40, "lr": 5e-4, "layer_decay": 0.8, "label_smoothing": 0.2},
    {"val_fraction": 0.0, "epochs": 40, "lr": 5e-4, "layer_decay": 0.8, "dropout": 0.2},
    {"val_fraction": 0.0, "epochs": 30, "lr": 5e-4, "layer_decay": 0.8},
    {"val_fraction": 0.0, "epochs": 40, "lr": 5e-4, "layer_decay": 0.8, "batch_size": 16},
)
SPLIT_SEEDS = (0, 1)
DEV_SEEDS = (100, 101)
DEV_PER_INTENT = 20


def _full_job(job: dict) -> dict:
    """Fit one recipe on one validation split; the per-epoch history is the result."""
    from bench_intent import read_banking
    from models.data import stratified_split
    from models.train import TrainConfig, fit

    import torch
    torch.set_num_threads(job["threads"])
    data = read_banking(Path(job["data_dir"]) / "train.csv")
    config = TrainConfig(seed=job["split_seed"], progress=False, patience=0, device=job["device"],
                         threads=job["threads"], **job["recipe"])
    train, val = stratified_split(data, config.val_fraction, job["split_seed"])
    t0 = time.perf_counter()
    result = fit(train, val, config)
    # A soup is scored as the average it serves, not as its first member's best epoch.
    best = result.soup_validation or result.history[result.best_epoch - 1]
    return {**job, "kind": "full", "best_epoch": result.best_epoch, "score": best["val_accuracy"],
            "loss": best["val_loss"], "history": result.history, "seconds": time.perf_counter() - t0}


def _few_job(job: dict) -> dict:
    """Fit one few-shot recipe on a dev draw; score on other train examples (never test)."""
    import numpy as np
    import torch

    from bench_intent import read_banking
    from models.data import sample_per_intent, stratified_split
    from models.train import TrainConfig, fit, predict_logits

    torch.set_num_threads(job["threads"])
    data = read_banking(Path(job["data_dir"]) / "train.csv")
    shots = sample_per_intent(data, job["shots"], job["dev_seed"])
    taken = set(zip(shots.texts, shots.labels))
    rest = data.subset(i for i, row in enumerate(zip(data.texts, data.labels)) if row not in taken)
    dev = sample_per_intent(rest, DEV_PER_INTENT, job["dev_seed"] + 1)
    config = TrainConfig(seed=job["dev_seed"], progress=False, device=job["device"], threads=job["threads"],
                         **job["recipe"])
    train, val = stratified_split(shots, config.val_fraction, job["dev_seed"])
    t0 = time.perf_counter()
    result = fit(train, val if len(val) else None, config)
    logits, emb = predict_logits(result.model, result.tokenizer, dev.texts)
    index = {y: i for i, y in enumerate(result.labels)}
    y = np.array([index[label] for label in dev.labels])
    loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)))
    # Dev accuracy at each kNN mix (the pipeline's bank over the training examples; fp32 torch
    # outputs), for bots trained without a validation split to choose a mix from.
    from engine.onnx_intent import knn_label_scores, starts_of
    from models.calibrate import build_bank, choose_mix
    from models.pipeline import BANK_MAX_PER_LABEL

    _, train_emb = predict_logits(result.model, result.tokenizer, train.texts)
    bank, counts = build_bank(train_emb, train.labels, result.labels, BANK_MAX_PER_LABEL, job["dev_seed"])
    _, by_mix = choose_mix(logits, knn_label_scores(emb, bank, starts_of(counts)), y)
    return {**job, "kind": "few", "best_epoch": result.best_epoch, "score": float((logits.argmax(1) == y).mean()),
            "loss": loss, "score_by_mix": by_mix, "seconds": time.perf_counter() - t0}


def _run(job: dict) -> dict:
    try:
        return _full_job(job) if job["kind"] == "full" else _few_job(job)
    except Exception as e:  # one failed recipe must not lose the others' results
        return {**job, "error": f"{type(e).__name__}: {e}"}


def choose(results: list[dict], recipes: tuple[dict, ...], kind: str) -> tuple[dict, list[dict]]:
    """Mean score per recipe over its seeds; best mean wins, lower mean loss breaks ties."""
    rows = []
    for i, recipe in enumerate(recipes):
        mine = [r for r in results if r["kind"] == kind and r["recipe_index"] == i and "error" not in r]
        if not mine:
            continue
        rows.append({"recipe_index": i, "recipe": recipe, "n": len(mine),
                     "score": statistics.mean(r["score"] for r in mine),
                     "loss": statistics.mean(r["loss"] for r in mine),
                     "best_epochs": [r["best_epoch"] for r in mine],
                     "seconds": statistics.mean(r["seconds"] for r in mine)})
    if not rows:  # nothing finished (or all failed): the pipeline's default, said in the output
        print(f"  no {kind} recipe finished: {[r.get('error') for r in results if r['kind'] == kind]}; "
              "using the default", flush=True)
        return {}, []
    best = max(rows, key=lambda r: (round(r["score"], 6), -r["loss"]))
    return best["recipe"], rows


def _pooled(fn, tasks: list, workers: int, budget: float | None, what: str):
    """``fn`` over ``tasks`` in fresh spawned processes (CUDA cannot be re-initialised in a
    forked child), yielding results as they finish; after ``budget`` seconds the rest are
    dropped, said in the output."""
    deadline = time.monotonic() + (budget or 1e9)
    with mp.get_context("spawn").Pool(max(1, min(workers, len(tasks))), maxtasksperchild=1) as pool:
        it = pool.imap_unordered(fn, tasks)
        for done in range(len(tasks)):
            try:
                yield it.next(timeout=max(0.1, deadline - time.monotonic()))
            except mp.TimeoutError:
                print(f"  {what} budget of {budget} s spent: {len(tasks) - done} dropped", flush=True)
                pool.terminate()
                return


def sweep(args: argparse.Namespace, full_recipes: tuple[dict, ...],
          few_recipes: tuple[dict, ...]) -> tuple[dict, dict, list[dict], list[dict], list[dict]]:
    base = {"data_dir": str(args.data_dir), "device": args.device, "threads": args.job_threads}
    jobs = [] if args.full_recipe is not None else [
        {**base, "kind": "full", "recipe_index": i, "recipe": r, "split_seed": s}
        for i, r in enumerate(full_recipes) for s in SPLIT_SEEDS]
    jobs += [] if args.fewshot_recipe is not None else [
        {**base, "kind": "few", "recipe_index": i, "recipe": r, "dev_seed": s, "shots": args.shots}
        for i, r in enumerate(few_recipes) for s in DEV_SEEDS]
    # The long full-data jobs first, so the short few-shot ones fill the gaps at the end.
    jobs.sort(key=lambda j: j["kind"] != "full")
    results = []
    for r in _pooled(_run, jobs, args.workers, args.sweep_budget, "sweep"):
        results.append(r)
        tag = f"{r['kind']} #{r['recipe_index']} seed {r.get('split_seed', r.get('dev_seed'))}"
        print(f"  {tag}: " + (r["error"] if "error" in r else
                              f"{100 * r['score']:.2f}% (epoch {r['best_epoch']}, {r['seconds']:.0f} s)"), flush=True)
        _save(args, {"stage": "sweep", "jobs": results})
    full, full_rows = (args.full_recipe, []) if args.full_recipe is not None else choose(results, full_recipes, "full")
    few, few_rows = (args.fewshot_recipe, []) if args.fewshot_recipe is not None else choose(results, few_recipes, "few")
    return full, few, full_rows, few_rows, results


def _save(args: argparse.Namespace, obj: dict) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(obj, indent=2) + "\n")


def _protocol(task: tuple[str, dict]) -> tuple[str, dict]:
    """One benchmark protocol in its own process (bench_intent's functions, unchanged)."""
    import bench_intent

    name, ns = task
    args = argparse.Namespace(**ns)
    train_data = bench_intent.read_banking(args.data_dir / "train.csv")
    test = bench_intent.read_banking(args.data_dir / "test.csv")
    try:
        res = getattr(bench_intent, f"protocol_{name}")(train_data, test, args)
    except Exception as e:
        return name, {"error": f"{type(e).__name__}: {e}"}
    return name, res


def protocols(args: argparse.Namespace, full: dict, few: dict, on_result=None) -> dict:
    from bench_intent import FEWSHOT_SEEDS, fewshot_summary

    ns = {"data_dir": args.data_dir, "work": args.work, "epochs": None, "seed": 0, "device": args.device,
          "quiet": True, "shots": args.shots, "fewshot_epochs": None, "recipe": full, "fewshot_recipe": few,
          "model": None, "skip_speed": args.skip_speed,
          # up to 7 processes (full, heldout, 5 few-shot seeds) share the cores
          "threads": max(args.job_threads, (os.cpu_count() or 1) // 7)}
    tasks = [(name, ns) for name in ("full", "heldout") if name in args.protocols]
    if "fewshot" in args.protocols:   # one process per seed: five small trainings side by side
        tasks += [("fewshot", {**ns, "fewshot_seeds": [s], "work": args.work / f"fs{s}"}) for s in FEWSHOT_SEEDS]
    out: dict = {}
    runs: list[dict] = []
    for name, res in _pooled(_protocol, tasks, args.workers, args.protocol_budget, "protocol"):
        if name == "fewshot" and "error" not in res:
            runs += res["runs"]
        elif name == "fewshot":
            out.setdefault("fewshot_errors", []).append(res["error"])
        else:
            out[name] = res
        print(f"  {name}: {res.get('error', 'done')}", flush=True)
        if on_result:
            on_result(out)
    if runs:
        out["fewshot"] = fewshot_summary(sorted(runs, key=lambda r: r["seed"]), args.shots, few)
    return out


def recipe_table(rows: list[dict], title: str) -> str:
    lines = [f"{title}: mean of {rows[0]['n'] if rows else 0} seeds"]
    for r in sorted(rows, key=lambda r: -r["score"]):
        lines.append(f"  {100 * r['score']:6.2f}%  loss {r['loss']:.3f}  epochs {r['best_epochs']}  "
                     f"{r['seconds']:5.0f} s  {json.dumps(r['recipe']) or '{}'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench_intent import RESULTS, default_data_dir, table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1, help="trainings run side by side")
    p.add_argument("--job-threads", type=int, default=1, help="torch CPU threads per training")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--only", choices=("sweep", "all"), default="all")
    p.add_argument("--work", type=Path, default=RESULTS / "models")
    p.add_argument("--out", type=Path, default=RESULTS / f"sweep-intent-{time.strftime('%Y%m%d-%H%M%S')}.json")
    p.add_argument("--skip-speed", action="store_true", help="leave speed to bench_intent --protocol speed on the target machine")
    p.add_argument("--sweep-budget", type=float, help="seconds; recipes unfinished by then are dropped")
    p.add_argument("--protocol-budget", type=float, help="seconds; protocols unfinished by then are dropped")
    p.add_argument("--full-recipe", type=json.loads, help="JSON TrainConfig fields: skip the full-data sweep")
    p.add_argument("--fewshot-recipe", type=json.loads, help="JSON TrainConfig fields: skip the few-shot sweep")
    p.add_argument("--full-recipes", type=json.loads,
                   help="full-data recipes to sweep instead of FULL_RECIPES: a JSON list")
    p.add_argument("--few-recipes", type=lambda v: FEW_RECIPES_ROUND2 if v == "round2" else json.loads(v),
                   help="few-shot recipes to sweep instead of FEW_RECIPES: a JSON list, or round2")
    p.add_argument("--protocols", type=lambda v: v.split(","), default=["full", "heldout", "fewshot"],
                   help="comma-separated protocols to run after the sweep")
    p.add_argument("--max-epochs", type=int, help="cap every recipe's epochs (a smoke test of this script)")
    args = p.parse_args(argv)
    full_recipes, few_recipes = tuple(args.full_recipes or FULL_RECIPES), tuple(args.few_recipes or FEW_RECIPES)
    if args.max_epochs:
        def capped(r: dict) -> dict:
            return {**r, "epochs": min(r.get("epochs", args.max_epochs), args.max_epochs)}
        full_recipes, few_recipes = tuple(map(capped, full_recipes)), tuple(map(capped, few_recipes))
    args.work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    full, few, full_rows, few_rows, jobs = sweep(args, full_recipes, few_recipes)
    report = {"device": args.device, "argv": sys.argv[1:], "full_recipe": full, "fewshot_recipe": few, "full_rows": full_rows,
              "fewshot_rows": few_rows, "jobs": jobs, "sweep_seconds": time.perf_counter() - t0}
    _save(args, report)
    print(recipe_table(full_rows, "full-data recipes, best-epoch validation accuracy"))
    print(recipe_table(few_rows, f"{args.shots}-shot recipes, dev accuracy"))
    if args.only == "all":
        def partial(out: dict) -> None:
            _save(args, {**report, "protocols": out})
        report["protocols"] = protocols(args, full, few, partial)
        report["total_seconds"] = time.perf_counter() - t0
        _save(args, report)
        print(table({k: v for k, v in report["protocols"].items() if isinstance(v, dict) and "error" not in v}))
        errors = {k: v for k, v in report["protocols"].items() if k == "fewshot_errors" or "error" in v}
        if errors:
            print(f"errors: {errors}")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
