"""bench/bench_intent.py's speed figures carry a probe of the host, so that a slow host can be told
from a slow model when two sessions' figures disagree."""
from .conftest import load_bench_script


def load_bench():
    return load_bench_script("bench_intent")


def test_host_probe_measures_the_loop_and_reads_the_load():
    probe = load_bench().host_probe()
    assert probe["python_loop_1e7_seconds"] > 0
    assert probe["load_average_1m"] >= 0
    assert probe["cpu_count"] >= 1
    assert probe["ort_int8_matmul_gops"] > 0


def test_the_matmul_probe_counts_two_operations_per_multiply_add(monkeypatch):
    # With a clock that advances one second per reading, each timed repeat takes exactly 1 s,
    # so the rate must be the product's multiply-adds x 2 x runs, in billions.
    bench = load_bench()
    ticks = iter(range(1_000))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(ticks)))
    assert bench.ort_int8_matmul_gops(rows=4, inner=8, cols=16, runs=10) == 2 * 4 * 8 * 16 * 10 / 1e9


def test_the_table_prints_the_probe_beside_the_speed_figures():
    bench = load_bench()
    speed = {"single_p50_ms": 1.2, "single_p99_ms": 3.9, "batched_qps_2threads": 1564.0,
             "host_probe": {"python_loop_1e7_seconds": 0.61, "load_average_1m": 0.4, "cpu_count": 2,
                            "ort_int8_matmul_gops": 612.4}}
    text = bench.table({"speed": speed})
    assert "1.20 / 3.90 ms" in text
    assert "0.61 s; 0.40" in text
    assert "612 GOPS" in text


def test_a_probe_from_before_the_matmul_probe_still_prints():
    bench = load_bench()
    speed = {"single_p50_ms": 1.2, "single_p99_ms": 3.9, "batched_qps_2threads": 1564.0,
             "host_probe": {"python_loop_1e7_seconds": 0.61, "load_average_1m": 0.4, "cpu_count": 2}}
    text = bench.table({"speed": speed})
    assert "0.61 s; 0.40" in text and "GOPS" not in text


def test_a_result_from_before_the_probe_still_prints():
    bench = load_bench()
    text = bench.table({"speed": {"single_p50_ms": 1.2, "single_p99_ms": 3.9, "batched_qps_2threads": 1564.0}})
    assert "host probe" not in text


def load_probe():
    return load_bench_script("probe_oos_scores")


def test_probe_mahalanobis_matches_the_textbook_distance():
    import numpy as np

    probe = load_probe()
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 4))
    labels = np.array(["a", "b", "c"] * 20)
    means, inv, _, _ = probe.fit_gaussians(emb, labels, ["a", "b", "c"], shrink=0.0)
    x = rng.normal(size=(5, 4))
    got = probe.mahalanobis(x, means, inv)
    want = np.array([[(xi - m) @ inv @ (xi - m) for m in means] for xi in x])
    assert np.allclose(got, want)


def test_probe_reports_the_best_in_scope_accuracy_that_keeps_the_recall():
    import numpy as np

    probe = load_probe()
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    correct = np.array([True, True, False, True, False, False])
    is_oos = np.array([False, False, False, False, True, True])
    # Rejecting both oos queries (threshold 0.6) keeps the 3 correct in-scope answers of 4.
    assert probe.best_in_scope_at(score, correct, is_oos, 1.0) == 0.75
    # Half the oos recall is reached already at threshold 0.5: still 3 of 4.
    assert probe.best_in_scope_at(score, correct, is_oos, 0.5) == 0.75
