"""bench/sweep_intent.py's selection rule: the recipe is chosen from validation/dev scores alone."""
from .conftest import load_bench_script


def load_sweep():
    return load_bench_script("sweep_intent")


def job(i, score, loss, seed=0, **extra):
    return {"kind": "full", "recipe_index": i, "score": score, "loss": loss, "best_epoch": 3, "seconds": 1.0,
            "split_seed": seed, **extra}


def test_best_mean_over_seeds_wins_not_the_best_single_run():
    sweep = load_sweep()
    recipes = ({}, {"lr": 2e-4})
    results = [job(0, 0.95, 0.3, 0), job(0, 0.90, 0.3, 1),   # mean 0.925, one lucky split
               job(1, 0.93, 0.3, 0), job(1, 0.93, 0.3, 1)]   # mean 0.930
    best, rows = sweep.choose(results, recipes, "full")
    assert best == {"lr": 2e-4}
    assert [r["n"] for r in rows] == [2, 2]


def test_lower_validation_loss_breaks_a_tie():
    sweep = load_sweep()
    recipes = ({}, {"lr": 3e-4})
    best, _ = sweep.choose([job(0, 0.93, 0.40), job(1, 0.93, 0.35)], recipes, "full")
    assert best == {"lr": 3e-4}


def test_failed_runs_are_skipped_and_nothing_finished_means_the_default():
    sweep = load_sweep()
    recipes = ({}, {"lr": 3e-4})
    failed = {"kind": "full", "recipe_index": 1, "error": "RuntimeError: out of memory"}
    best, rows = sweep.choose([job(0, 0.90, 0.4), failed], recipes, "full")
    assert best == {} and [r["recipe_index"] for r in rows] == [0]
    assert sweep.choose([failed], recipes, "full") == ({}, [])
