"""The fine-tuned intent model, served by ONNX Runtime and the ``tokenizers`` fast tokenizer.

A model folder (written by ``kefu train``, see docs/model.md) holds:

- ``model.onnx``: int8 encoder + classifier; inputs ``input_ids``/``attention_mask`` (int64,
  batch x tokens), outputs ``logits`` (batch x labels) and ``embedding`` (batch x dim, L2-normalised).
- ``tokenizer.json``: padding off, truncation at ``max_length`` tokens.
- ``labels.json``: labels in logit order, the out-of-scope ``threshold`` and how the score
  it applies to is computed, plus provenance (base model, data hash, library versions).
- ``bank.npy`` (when ``labels.json`` says ``oos_score: knn_cosine``): L2-normalised embeddings
  of training-example prototypes, grouped by label in logit order.

Scores: ``confidence`` is ``(1 - mix) * softmax(logits) + mix * softmax(knn / T)`` where ``knn``
holds each label's best cosine to its prototypes; the out-of-scope score is the best cosine
to any prototype (``knn_cosine``) or the best confidence (``max_prob``).  A text is in scope
when that score reaches ``threshold``.

Never imports torch or transformers (a test checks it in a fresh interpreter).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ModelError
from .intent import IntentClassifier
from .types import Classification, IntentScore

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.json"
OOS_SCORES = ("knn_cosine", "max_prob")
#: Sub-batch size inside predict_batch: texts are sorted by length and padded per sub-batch.
CHUNK = 64
#: Up to this many texts, kNN similarities are computed without BLAS (see knn_label_scores).
SMALL_BATCH = 16


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def knn_label_scores(emb: np.ndarray, bank: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Each label's best cosine between ``emb`` rows and that label's bank rows.

    ``bank`` rows are grouped by label; ``starts[i]`` is where label ``i``'s group begins.
    """
    if len(emb) <= SMALL_BATCH:
        # einsum stays on this thread; a BLAS matmul this small would wake BLAS's worker
        # threads, which costs milliseconds when the other cores are busy.
        sims = np.einsum("bd,nd->bn", emb, bank)
    else:
        sims = emb @ bank.T
    return np.maximum.reduceat(sims, starts, axis=1)


def combine_scores(logits: np.ndarray, knn: np.ndarray | None, *, mix: float, temperature: float,
                   oos_score: str) -> tuple[np.ndarray, np.ndarray]:
    """Turn raw model outputs into (per-label confidence, out-of-scope score) arrays."""
    probs = softmax(logits.astype(np.float32, copy=True))
    if knn is not None and mix > 0:
        probs = (1.0 - mix) * probs + mix * softmax(knn / temperature)
    if oos_score == "knn_cosine":
        if knn is None:
            raise ValueError("knn_cosine needs the bank's label scores")
        return probs, knn.max(axis=1)
    return probs, probs.max(axis=1)


class OnnxIntentClassifier(IntentClassifier):
    """Thread-safe ONNX intent classifier; ``classify`` goes through an async micro-batcher."""

    source = "model"

    def __init__(self, session: Any, tokenizer: Any, meta: dict[str, Any], bank: np.ndarray | None,
                 *, path: Path, max_batch: int = 32, max_wait_ms: float = 2.0) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self.path = path
        self.meta = meta
        self.labels = tuple(meta["labels"])
        self.threshold = float(meta["threshold"])
        self.oos_score = meta.get("oos_score", "max_prob")
        knn = meta.get("knn") or {}
        self._mix = float(knn.get("mix", 0.0))
        self._temperature = float(knn.get("temperature", 0.05))
        self._bank = bank
        self._starts = None
        if bank is not None:
            counts = np.asarray(knn["counts"], dtype=np.int64)
            self._starts = starts_of(counts)
        self._max_batch = max_batch
        self._max_wait_ms = max_wait_ms
        self._batcher = None
        self._batcher_lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike[str], *, threads: int = 1, max_batch: int = 32,
             max_wait_ms: float = 2.0, model_file: str = MODEL_FILE) -> "OnnxIntentClassifier":
        """Open a model folder, validating every file; raises ModelError naming the bad file.

        ``threads``: ONNX Runtime threads per inference (1 suits a server that runs
        several workers; raise it for one big batch job).
        """
        import onnxruntime as ort

        folder = Path(path)
        if not folder.is_dir():
            raise ModelError(f"{folder}: no such model folder")
        labels_path, model_path, tok_path = folder / LABELS_FILE, folder / model_file, folder / TOKENIZER_FILE
        meta = _read_labels(labels_path)
        for p in (model_path, tok_path):
            if not p.is_file():
                raise ModelError(f"{p}: missing (the model folder must hold {model_file}, "
                                 f"{TOKENIZER_FILE} and {LABELS_FILE}; run `kefu train`)")
        tokenizer = load_tokenizer(tok_path, int(meta.get("max_length", 64)))

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf types
            raise ModelError(f"{model_path}: not a loadable ONNX model ({str(e).splitlines()[0]})") from e
        _check_session(session, model_path, labels_path, tok_path, tokenizer, meta)

        bank = None
        knn = meta.get("knn") or {}
        if meta["oos_score"] == "knn_cosine" or float(knn.get("mix", 0.0)) > 0:
            bank = _read_bank(folder / knn["bank"], meta, session)
        return cls(session, tokenizer, meta, bank, path=folder, max_batch=max_batch, max_wait_ms=max_wait_ms)

    # ------------------------------------------------------------------ inference
    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Raw (logits, embedding) for ``texts`` in their order; batches sorted by length."""
        return encode_texts(self._session, self._tokenizer, texts, len(self.labels))

    def scores(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(confidence per label, out-of-scope score) arrays: what predict_batch ranks."""
        return self.scores_of(*self.encode(texts))

    def scores_of(self, logits: np.ndarray, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``scores`` from outputs ``encode`` already returned (for a caller that needs the
        embeddings too, without running the model twice)."""
        knn = knn_label_scores(emb, self._bank, self._starts) if self._bank is not None and len(emb) else None
        return combine_scores(logits, knn, mix=self._mix, temperature=self._temperature,
                              oos_score=self.oos_score)

    def predict_batch(self, texts: Sequence[str], top_k: int = 3) -> list[Classification]:
        if not texts:
            return []
        probs, oos = self.scores(texts)
        k = max(1, min(top_k, len(self.labels)))
        top = np.argsort(-probs, axis=1)[:, :k]
        out = []
        for row, idx in enumerate(top):
            ranked = tuple(IntentScore(self.labels[j], float(probs[row, j])) for j in idx)
            out.append(Classification(ranked, bool(oos[row] >= self.threshold), self.source))
        return out

    async def classify(self, text: str, top_k: int = 3) -> Classification:
        """Classify on the shared micro-batcher: concurrent visitors share one ONNX run."""
        from .batcher import MicroBatcher

        with self._batcher_lock:
            if self._batcher is None:
                self._batcher = MicroBatcher(lambda items: self._predict_items(items),
                                             max_batch=self._max_batch, max_wait_ms=self._max_wait_ms,
                                             name="kefu-intent")
        return await self._batcher.submit((text, top_k))

    def _predict_items(self, items: list[tuple[str, int]]) -> list[Classification]:
        k = max(top_k for _, top_k in items)
        results = self.predict_batch([t for t, _ in items], k)
        return [Classification(r.ranked[:top_k], r.in_scope, r.source) for r, (_, top_k) in zip(results, items)]

    def close(self) -> None:
        with self._batcher_lock:
            if self._batcher is not None:
                self._batcher.close()
                self._batcher = None


# ---------------------------------------------------------------------- shared with training
def load_tokenizer(path: Path, max_length: int) -> Any:
    """A fast tokenizer as training and serving both use it: no padding (batches are
    padded to their own longest text), truncation at ``max_length``."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ModelError(f"{path}: not a valid tokenizers file ({e})") from e
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return tokenizer


def encode_texts(session: Any, tokenizer: Any, texts: Sequence[str],
                 n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Run an (int8 or fp32) model session: (logits, embedding) for ``texts`` in their
    order, in chunks sorted by length so each is padded only to its own longest text.
    Export's agreement checks call this too, so they test exactly what serving runs."""
    n = len(texts)
    if n == 0:
        return np.zeros((0, n_labels), np.float32), np.zeros((0, 0), np.float32)
    encs = tokenizer.encode_batch([str(t) for t in texts]) if n > 1 else [tokenizer.encode(str(texts[0]))]
    ids = [e.ids for e in encs]
    order = sorted(range(n), key=lambda i: len(ids[i]))
    logits_parts, emb_parts = [], []
    for s in range(0, n, CHUNK):
        chunk = order[s:s + CHUNK]
        width = max(len(ids[i]) for i in chunk)
        input_ids = np.zeros((len(chunk), width), np.int64)
        mask = np.zeros((len(chunk), width), np.int64)
        for row, i in enumerate(chunk):
            input_ids[row, :len(ids[i])] = ids[i]
            mask[row, :len(ids[i])] = 1
        logits, emb = session.run(None, {"input_ids": input_ids, "attention_mask": mask})
        logits_parts.append(logits)
        emb_parts.append(emb)
    inverse = np.empty(n, np.int64)
    inverse[order] = np.arange(n)
    return np.concatenate(logits_parts)[inverse], np.concatenate(emb_parts)[inverse]


def starts_of(counts: Sequence[int]) -> np.ndarray:
    """Offsets of each label's first prototype in the bank (prototypes grouped by label)."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


# ---------------------------------------------------------------------- validation
def _read_labels(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError(f"{path}: missing (run `kefu train` to build the model folder)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: expected a JSON object")
    labels = meta.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise ModelError(f"{path}: 'labels' must be a non-empty list of intent names")
    if len(set(labels)) != len(labels):
        raise ModelError(f"{path}: 'labels' holds duplicates")
    if not isinstance(meta.get("threshold"), (int, float)) or isinstance(meta.get("threshold"), bool):
        raise ModelError(f"{path}: 'threshold' must be a number")
    meta.setdefault("oos_score", "max_prob")
    if meta["oos_score"] not in OOS_SCORES:
        raise ModelError(f"{path}: 'oos_score' must be one of {', '.join(OOS_SCORES)}")
    knn = meta.get("knn")
    if meta["oos_score"] == "knn_cosine" or knn:
        if not isinstance(knn, dict) or not isinstance(knn.get("bank"), str) \
                or not isinstance(knn.get("counts"), list) or len(knn["counts"]) != len(labels) \
                or not all(isinstance(c, int) and c > 0 for c in knn["counts"]):
            raise ModelError(f"{path}: 'knn' must give 'bank' (a file name) and 'counts' "
                             "(a positive count per label)")
    return meta


def _check_session(session: Any, model_path: Path, labels_path: Path, tok_path: Path, tokenizer: Any,
                   meta: dict[str, Any]) -> None:
    inputs = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    if not {"input_ids", "attention_mask"} <= inputs or outputs[:2] != ["logits", "embedding"]:
        raise ModelError(f"{model_path}: expected inputs input_ids, attention_mask and outputs "
                         f"logits, embedding; found inputs {sorted(inputs)}, outputs {outputs}")
    n_logits = session.get_outputs()[0].shape[-1]
    if isinstance(n_logits, int) and n_logits != len(meta["labels"]):
        raise ModelError(f"{labels_path}: lists {len(meta['labels'])} labels but {model_path.name} "
                         f"outputs {n_logits} logits")
    model_vocab = session.get_modelmeta().custom_metadata_map.get("vocab_size")
    tok_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if model_vocab is not None and int(model_vocab) != tok_vocab:
        raise ModelError(f"{tok_path}: vocabulary of {tok_vocab} tokens does not match "
                         f"{model_path.name}'s {model_vocab}; use the tokenizer the model was trained with")
    # One probe run catches a graph that loads but cannot run, and a labels count the
    # graph does not state statically.
    try:
        logits, _ = session.run(None, {"input_ids": np.array([[tok_vocab - 1]], np.int64),
                                       "attention_mask": np.ones((1, 1), np.int64)})
    except Exception as e:
        raise ModelError(f"{model_path}: fails on a probe input ({str(e).splitlines()[0]}); "
                         f"is {tok_path.name} the model's tokenizer?") from e
    if logits.shape[-1] != len(meta["labels"]):
        raise ModelError(f"{labels_path}: lists {len(meta['labels'])} labels but {model_path.name} "
                         f"outputs {logits.shape[-1]} logits")


def _read_bank(path: Path, meta: dict[str, Any], session: Any) -> np.ndarray:
    if not path.is_file():
        raise ModelError(f"{path}: missing ({LABELS_FILE} asks for kNN scores over this prototype bank)")
    try:
        bank = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ModelError(f"{path}: not a readable .npy array ({e})") from e
    total = sum(meta["knn"]["counts"])
    dim = session.get_outputs()[1].shape[-1]
    if bank.ndim != 2 or bank.shape[0] != total or (isinstance(dim, int) and bank.shape[1] != dim):
        raise ModelError(f"{path}: shape {bank.shape} does not match {LABELS_FILE} "
                         f"({total} rows) and the model's embedding size ({dim})")
    return np.ascontiguousarray(bank, dtype=np.float32)
