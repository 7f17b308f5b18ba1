"""bench/bench_intent.py's speed figures carry a probe of the host, so that a slow host can be told
from a slow model when two sessions' figures disagree."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_intent", ROOT / "bench" / "bench_intent.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_intent", module)
    spec.loader.exec_module(module)
    return module


def test_host_probe_measures_the_loop_and_reads_the_load():
    probe = load_bench().host_probe()
    assert probe["python_loop_1e7_seconds"] > 0
    assert probe["load_average_1m"] >= 0
    assert probe["cpu_count"] >= 1


def test_the_table_prints_the_probe_beside_the_speed_figures():
    bench = load_bench()
    speed = {"single_p50_ms": 1.2, "single_p99_ms": 3.9, "batched_qps_2threads": 1564.0,
             "host_probe": {"python_loop_1e7_seconds": 0.61, "load_average_1m": 0.4, "cpu_count": 2}}
    text = bench.table({"speed": speed})
    assert "1.20 / 3.90 ms" in text
    assert "0.61 s; 0.40" in text


def test_a_result_from_before_the_probe_still_prints():
    bench = load_bench()
    text = bench.table({"speed": {"single_p50_ms": 1.2, "single_p99_ms": 3.9, "batched_qps_2threads": 1564.0}})
    assert "host probe" not in text
