"""The whole ``kefu train`` pipeline, shared by the CLI, the notebooks and the benchmark.

data -> stratified validation split -> fit (best epoch) -> ONNX fp32 (fused) -> int8 ->
agreement checks -> kNN prototype bank from the training texts (int8 embeddings) ->
calibration on the validation split (kNN mix, OOS score, threshold) -> labels.json ->
evaluation report on the validation split.
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.errors import ModelError
from engine.onnx_intent import LABELS_FILE, TOKENIZER_FILE, OnnxIntentClassifier

from .calibrate import TEMPERATURE, Calibration, build_bank, calibrate
from .data import Dataset, stratified_split
from .evaluate import evaluate, write_report
from .export import export_model
from .install import baseline_scores
from .train import FitResult, TrainConfig, fit

BANK_FILE = "bank.npy"
#: Prototypes kept per intent in bank.npy (k-means centroids above this many examples).
BANK_MAX_PER_LABEL = 16


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import tokenizers
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "tokenizers": tokenizers.__version__,
            "numpy": np.__version__}


def train_model(data: Dataset, out_dir: str | Path, config: TrainConfig | None = None, *,
                bank_max_per_label: int = BANK_MAX_PER_LABEL, keep_fp32: bool = True,
                oos_score: str = "knn_cosine", prepare: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Train on ``data`` and write a complete model folder to ``out_dir``; returns metrics.json's content.

    metrics.json's ``baseline`` is the knowledge classifier's accuracy on the same validation
    split (texts prepared by ``prepare``, as the bot serving them prepares them): the figure
    :func:`models.install.judge` compares the model with before a bot serves it.

    With ``config.refit`` the folder holds a second model, trained on *all* of ``data`` for the
    number of epochs the split run found best, with the split run's kNN mix, OOS score and
    threshold carried over (see ``_train_refit``)."""
    config = config or TrainConfig()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is not a folder")
    if config.refit:
        return _train_refit(data, out, config, bank_max_per_label=bank_max_per_label, keep_fp32=keep_fp32,
                            oos_score=oos_score, prepare=prepare)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, val = stratified_split(data, config.val_fraction, config.seed)
    fitted = fit(train, val if len(val) else None, config)
    return _write_folder(out, data, train, val, fitted, config, t0, bank_max_per_label=bank_max_per_label,
                         keep_fp32=keep_fp32, oos_score=oos_score, prepare=prepare)


def _train_refit(data: Dataset, out: Path, config: TrainConfig, *, bank_max_per_label: int,
                 keep_fp32: bool, oos_score: str, prepare: Callable[[str], str] | None) -> dict[str, Any]:
    """The split run chooses; the refit serves.  A validation split is the only honest way to
    choose the epoch count, the kNN mix and the OOS threshold, but it keeps a tenth of the
    examples out of training (about half a point on BANKING77, docs/model.md).  So: the whole
    pipeline runs on the split (its report, on the validation split, is kept: the refit has no
    held-out data to report on), then a model from the same start trains on every example for
    the split run's best epoch count (a soup: its members' mean) and is exported with the split
    model's calibration.  The threshold is then an estimate made on a sibling model, which
    ``threshold_method`` says."""
    from dataclasses import replace

    if not config.val_fraction:
        raise ModelError("refit needs a validation split to choose on: --val-fraction must be above 0")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    split_dir = out / "refit-split"
    try:
        split = train_model(data, split_dir, replace(config, refit=False), bank_max_per_label=bank_max_per_label,
                            keep_fp32=False, oos_score=oos_score, prepare=prepare)
        report = out / "report"
        if report.exists():
            shutil.rmtree(report)
        if (split_dir / "report").exists():
            shutil.move(str(split_dir / "report"), str(report))
    finally:
        shutil.rmtree(split_dir, ignore_errors=True)
    epochs = round(sum(split["soup"]["member_best_epochs"]) / config.soup) if config.soup > 1 else split["best_epoch"]
    refit_config = replace(config, refit=False, epochs=max(1, epochs), val_fraction=0.0)
    fitted = fit(data, None, refit_config)
    sc = split["calibration"]  # Calibration.to_dict(): rebuilt whole, with the method saying where it came from
    cal = Calibration(**{**sc, "method": f"refit: carried over from the split model ({sc['method']})"})
    split_summary = {k: split.get(k) for k in ("n_train", "n_val", "best_epoch", "history", "validation", "soup",
                                               "train_seconds")}
    return _write_folder(out, data, data, data.subset([]), fitted, refit_config, t0,
                         bank_max_per_label=bank_max_per_label, keep_fp32=keep_fp32, oos_score=oos_score,
                         calibration=cal, keep_report=True, train_config=config,
                         # the split model's validation: the refit has no held-out data
                         extra={"refit": {"epochs": refit_config.epochs, "split": split_summary},
                                "validation": split.get("validation"), "baseline": split.get("baseline")})


def _check_texts(train: Dataset, val: Dataset, n_train: int = 200) -> list[str]:
    """Texts for the export's agreement checks: the validation split, topped up (when it has
    under 50) with up to ``n_train`` training texts taken evenly, so every intent counts even
    when the data is sorted by label."""
    if len(val) >= 50:
        return list(val.texts)
    step = max(1, len(train) // n_train)
    return list(val.texts) + list(train.texts[::step][:n_train])


def _write_folder(out: Path, data: Dataset, train: Dataset, val: Dataset, fitted: FitResult, config: TrainConfig,
                  t0: float, *, bank_max_per_label: int, keep_fp32: bool, oos_score: str,
                  calibration: Calibration | None = None, keep_report: bool = False,
                  train_config: TrainConfig | None = None, extra: dict[str, Any] | None = None,
                  prepare: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Export, kNN bank, calibration (on ``val``, unless one is given), labels.json, report and
    metrics.json (with ``extra``'s keys on top)."""
    labels = list(fitted.labels)

    export = export_model(fitted.model, fitted.tokenizer, labels, out, _check_texts(train, val), keep_fp32=keep_fp32)
    fitted.tokenizer.save(str(out / TOKENIZER_FILE))
    meta: dict[str, Any] = {
        "format": 1, "labels": labels, "threshold": 0.0, "oos_score": "max_prob",
        "max_length": config.max_length,
        "vocab_size": fitted.tokenizer.get_vocab_size(with_added_tokens=True),
        "base_model": str(fitted.base), "base_model_name": fitted.base.name,
        "data_sha256": data.fingerprint(), "data_source": data.source, "n_examples": len(data),
        "train_config": (train_config or config).to_dict(), "versions": versions(),
    }
    _write_json(out / LABELS_FILE, meta)

    # Bank and calibration use the int8 model's own outputs: the scores serving will see.
    clf = OnnxIntentClassifier.load(out, threads=config.threads or 2)
    try:
        _, train_emb = clf.encode(list(train.texts))
        bank, counts = build_bank(train_emb, train.labels, labels, bank_max_per_label, config.seed)
        np.save(out / BANK_FILE, bank)
        index = {y: i for i, y in enumerate(labels)}
        if calibration is not None:
            cal = calibration
        elif len(val):
            val_logits, val_emb = clf.encode(list(val.texts))
            cal = calibrate(val_logits, val_emb, np.array([index[y] for y in val.labels]), bank, counts,
                            seed=config.seed, oos_score=oos_score)
        else:
            cal = Calibration(0.0, TEMPERATURE, oos_score, 0.0,
                              "none: no validation split; every text is in scope")
    finally:
        clf.close()
    meta.update({"threshold": cal.threshold, "oos_score": cal.oos_score, "threshold_method": cal.method,
                 "knn": {"bank": BANK_FILE, "counts": counts, "mix": cal.mix, "temperature": cal.temperature}})
    _write_json(out / LABELS_FILE, meta)

    result: dict[str, Any] = {"n_train": len(train), "n_val": len(val), "best_epoch": fitted.best_epoch,
                              "stopped_early": fitted.stopped_early, "history": fitted.history, "train_seconds": fitted.seconds,
                              "export": export.to_dict(), "calibration": cal.to_dict()}
    if config.soup > 1:
        result["soup"] = {"members": config.soup, "member_best_epochs": fitted.member_best_epochs,
                          "validation_fp32": fitted.soup_validation}
    report = out / "report"
    if report.exists() and not keep_report:
        shutil.rmtree(report)
    if len(val):
        clf = OnnxIntentClassifier.load(out, threads=config.threads or 2)
        try:
            metrics, probs, score = evaluate(clf, val)
        finally:
            clf.close()
        result["validation"] = {k: metrics[k] for k in ("n", "accuracy", "macro_f1", "in_scope_accuracy")}
        result["baseline"] = baseline_scores(train, val, prepare)
        write_report(report, val, labels, metrics, probs, score, extra={"data": "validation split"})
    result.update(extra or {})
    result["total_seconds"] = time.perf_counter() - t0
    _write_json(out / "metrics.json", result)
    return result


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
