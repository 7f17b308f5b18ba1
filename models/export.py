"""Export a fitted IntentNet to ONNX, fuse it, quantize it to int8, and check agreement.

Tolerances (docs/model.md), checked on the validation texts (or a sample of training
texts), failing with ModelError beyond them:

- ONNX fp32 (fused) vs torch: ``max |logit difference| <= TORCH_ATOL + TORCH_RTOL * |logit|``
  and ``max |embedding difference| <= TORCH_ATOL``.
- int8 vs fp32: at most ``INT8_MAX_CONFIDENT_FLIPS`` of the texts (rounded down; none in a
  check of fewer than 100 texts) may change their top intent while their fp32 probability
  margin (best minus second) is at least ``INT8_MARGIN``, and overall top-1 agreement must
  be at least ``INT8_MIN_AGREEMENT`` (when 200 or more texts are checked).  Near-ties may
  flip; confident answers only very rarely.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from engine.errors import ModelError
from engine.onnx_intent import softmax

from .train import IntentNet, pad_batch, predict_logits

TORCH_ATOL = 1e-3
TORCH_RTOL = 1e-3
INT8_MARGIN = 0.2
INT8_MIN_AGREEMENT = 0.97
INT8_MAX_CONFIDENT_FLIPS = 0.01
OPSET = 17

log = logging.getLogger(__name__)


@dataclass
class ExportReport:
    torch_max_logit_diff: float
    torch_max_embedding_diff: float
    int8_top1_agreement: float
    int8_confident_flips: int
    int8_max_prob_diff: float
    n_checked: int
    fp32_bytes: int
    int8_bytes: int
    fused_attention_layers: int     # Attention nodes after fusion; fewer than the layers = slower serving

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def export_fp32(model: IntentNet, path: Path) -> Path:
    """torch -> ONNX (TorchScript exporter, ``dynamo=False``) with dynamic batch and length axes."""
    model.eval()
    ids, mask = pad_batch([[101, 7592, 2088, 102], [101, 7592, 102]])
    with torch.no_grad():
        torch.onnx.export(
            model, (ids, mask), str(path), dynamo=False, opset_version=OPSET,
            input_names=["input_ids", "attention_mask"], output_names=["logits", "embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                          "logits": {0: "batch"}, "embedding": {0: "batch"}})
    return path


def fuse(src: Path, dst: Path, *, num_heads: int, hidden_size: int, **metadata: Any) -> int:
    """ONNX Runtime's transformer optimizer: fused attention, LayerNorm, GELU (faster, same
    maths).  Writes ``dst`` with ``metadata`` in its properties (a loader checks the vocabulary
    size and label count there); returns how many Attention nodes the fusion produced."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                         opt_level=1, use_gpu=False)
    props = {p.key: p.value for p in opt.model.metadata_props}
    props.update({k: str(v) for k, v in metadata.items()})
    onnx.helper.set_model_props(opt.model, props)
    opt.save_model_to_file(str(dst))
    return sum(node.op_type == "Attention" for node in opt.model.graph.node)


def quantize_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantization with per-channel weight scales (MatMul/Attention/Gather weights;
    activations quantized per call); per-channel keeps accuracy within a tenth of a point."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Attention", "Gather"],
                     extra_options={"DefaultTensorType": 1})  # FLOAT: the fused ops defeat shape inference
    return dst


def run_onnx(path: Path, tokenizer: Any, texts: Sequence[str], threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits, embedding) of an exported model, through the very code serving runs."""
    import onnxruntime as ort

    from engine.onnx_intent import encode_texts

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return encode_texts(sess, tokenizer, texts, sess.get_outputs()[0].shape[-1] or 0)


def export_model(model: IntentNet, tokenizer: Any, labels: Sequence[str], out_dir: Path,
                 check_texts: Sequence[str], *, keep_fp32: bool = True) -> ExportReport:
    """Write ``model.onnx`` (int8) and, if ``keep_fp32``, ``model.fp32.onnx`` into ``out_dir``,
    after checking both against torch and each other."""
    cfg = model.encoder.config
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    check_texts = list(check_texts)[:512]
    with tempfile.TemporaryDirectory(prefix="kefu-export-") as tmp:
        fp32 = out_dir / "model.fp32.onnx"
        fused = fuse(export_fp32(model, Path(tmp) / "raw.onnx"), fp32, num_heads=cfg.num_attention_heads,
                     hidden_size=cfg.hidden_size, vocab_size=vocab_size, num_labels=len(labels))
    int8 = quantize_int8(fp32, out_dir / "model.onnx")

    t_logits, t_emb = predict_logits(model, tokenizer, check_texts)
    f_logits, f_emb = run_onnx(fp32, tokenizer, check_texts)
    logit_diff = np.abs(t_logits - f_logits)
    emb_diff = float(np.abs(t_emb - f_emb).max())
    if (logit_diff > TORCH_ATOL + TORCH_RTOL * np.abs(t_logits)).any() or emb_diff > TORCH_ATOL:
        raise ModelError(f"{fp32}: ONNX output differs from torch beyond tolerance (max logit diff "
                         f"{logit_diff.max():.2e}, max embedding diff {emb_diff:.2e}; allowed "
                         f"{TORCH_ATOL:g} + {TORCH_RTOL:g}*|logit|)")

    q_logits, _ = run_onnx(int8, tokenizer, check_texts)
    p32, p8 = softmax(f_logits.copy()), softmax(q_logits.copy())
    top32, top8 = p32.argmax(1), p8.argmax(1)
    srt = np.sort(p32, axis=1)
    margin = srt[:, -1] - (srt[:, -2] if p32.shape[1] > 1 else 0)
    flips = int(((top32 != top8) & (margin >= INT8_MARGIN)).sum())
    agreement = float((top32 == top8).mean())
    allowed = int(INT8_MAX_CONFIDENT_FLIPS * len(check_texts))
    if flips > allowed or (len(check_texts) >= 200 and agreement < INT8_MIN_AGREEMENT):
        raise ModelError(f"{int8}: int8 model disagrees with fp32 beyond tolerance: {flips} top-1 changes "
                         f"with an fp32 margin >= {INT8_MARGIN} (allowed {allowed} of {len(check_texts)}), "
                         f"top-1 agreement {agreement:.4f} (required {INT8_MIN_AGREEMENT} from 200 texts)")
    if fused < cfg.num_hidden_layers:
        # Same maths but slower: unfused, a query took 1.48 ms against 1.19-1.27 ms (docs/model.md);
        # the optimizer's patterns depend on the torch/transformers/onnxruntime versions.
        log.warning("%s: ONNX Runtime fused attention in %d of %d layers; serving will be slower",
                    fp32, fused, cfg.num_hidden_layers)
    report = ExportReport(float(logit_diff.max()), emb_diff, agreement, flips, float(np.abs(p32 - p8).max()),
                          len(check_texts), fp32.stat().st_size, int8.stat().st_size, fused)
    if not keep_fp32:
        fp32.unlink()
    return report
