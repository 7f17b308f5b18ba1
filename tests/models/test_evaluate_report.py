"""models.evaluate and `kefu eval`: metrics with out-of-scope rows, the report files, --json."""
import json

import numpy as np
import pytest

from models.calibrate import best_threshold, build_bank
from models.data import Dataset, tiny_dataset, write_csv
from models.evaluate import compute_metrics, write_report

from .conftest import cli

LABELS = ["a", "b"]


def metrics_for(true, probs, score, threshold=0.5):
    return compute_metrics(LABELS, true, np.array(probs, np.float32), np.array(score, np.float32), threshold)


def test_in_scope_accuracy_needs_a_correct_and_accepted_answer():
    m = metrics_for(["a", "b", "a", "oos"], [[.9, .1], [.2, .8], [.3, .7], [.6, .4]], [.9, .4, .9, .2])
    assert m["accuracy"] == pytest.approx(2 / 3)  # closed-set: row 3 is wrong
    assert m["in_scope_accuracy"] == pytest.approx(1 / 3)  # row 2 correct but rejected
    assert m["oos_recall"] == 1.0
    assert (m["n"], m["n_in_scope"], m["n_oos"]) == (4, 3, 1)


def test_oos_recall_is_null_without_oos_rows():
    m = metrics_for(["a", "b"], [[.9, .1], [.1, .9]], [.9, .9])
    assert m["oos_recall"] is None and m["oos_curve"] == [] and m["accuracy"] == 1.0


def test_the_trade_off_curve_spans_every_threshold():
    m = metrics_for(["a", "oos"], [[.9, .1], [.6, .4]], [.9, .2])
    curve = m["oos_curve"]
    assert curve[0]["oos_recall"] == 0.0 and curve[0]["in_scope_accuracy"] == 1.0
    assert curve[-1]["oos_recall"] == 1.0
    assert m["oos_auroc"] == 1.0


def test_per_intent_scores_and_macro_f1():
    m = metrics_for(["a", "a", "b"], [[.9, .1], [.2, .8], [.1, .9]], [1, 1, 1])
    assert m["per_intent"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_unknown_labels_count_as_errors_and_are_listed():
    m = metrics_for(["a", "c"], [[.9, .1], [.9, .1]], [1, 1])
    assert m["unknown_labels"] == ["c"] and m["accuracy"] == 0.5


def test_report_files_are_written(tmp_path):
    data = Dataset(("x", "y", "z"), ("a", "b", "oos"))
    probs = np.array([[.9, .1], [.6, .4], [.5, .5]], np.float32)
    score = np.array([.9, .9, .9], np.float32)
    m = compute_metrics(LABELS, data.labels, probs, score, 0.5)
    out = write_report(tmp_path / "r", data, LABELS, m, probs, score)
    for name in ("metrics.json", "per_intent.csv", "misclassified.csv", "confusion_matrix.png",
                 "confidence_histogram.png", "oos_curve.png"):
        assert (out / name).is_file(), name
    wrong = (out / "misclassified.csv").read_text().splitlines()
    assert len(wrong) == 3  # header, the wrong in-scope row, the accepted OOS row


def test_threshold_maximises_in_scope_accuracy_plus_oos_recall():
    t, in_acc, oos_rec = best_threshold(np.array([.9, .8, .7]), np.array([True, True, True]), np.array([.3, .75]))
    assert t == pytest.approx(.8) and in_acc == pytest.approx(2 / 3) and oos_rec == 1.0


def test_bank_caps_prototypes_per_intent():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 4)).astype(np.float32)
    labels = ["a"] * 20 + ["b"] * 10
    bank, counts = build_bank(emb, labels, ["a", "b"], max_per_label=5)
    assert counts == [5, 5] and bank.shape == (10, 4)
    assert np.allclose(np.linalg.norm(bank, axis=1), 1, atol=1e-5)


def test_eval_cli_prints_json_metrics_with_oos_rows(trained, tmp_path, capsys):
    d = tiny_dataset(3, seed=5)
    rows = Dataset(d.texts + ("what is the weather on mars",), d.labels + ("oos",))
    data = write_csv(rows, tmp_path / "eval.csv")
    assert cli(["eval", "--model", str(trained), "--data", str(data), "--json", "--report", str(tmp_path / "r")]) == 0
    m = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "macro_f1", "in_scope_accuracy", "oos_recall", "n"):
        assert key in m
    assert m["n"] == len(rows) and m["n_oos"] == 1
    assert (tmp_path / "r" / "confusion_matrix.png").is_file()


def test_eval_cli_prints_a_summary_line(trained, tmp_path, capsys):
    data = write_csv(tiny_dataset(3), tmp_path / "eval.csv")
    assert cli(["eval", "--model", str(trained), "--data", str(data)]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_eval_cli_reports_a_bad_model_folder(tmp_path, capsys):
    data = write_csv(tiny_dataset(3), tmp_path / "eval.csv")
    assert cli(["eval", "--model", str(tmp_path / "none"), "--data", str(data)]) == 1
    assert "no such model folder" in capsys.readouterr().err
