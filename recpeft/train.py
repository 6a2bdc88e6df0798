"""The Trainer: one loop for LoRA adapters and for dense fine-tuning of a whole model.

The loop optimizes the model's trainable parameters (``requires_grad``) on mini-batches of a
:class:`~recpeft.batch.BatchSource`. Each optimizer step t (0-based, T planned) does:

    loss  = loss_fn(model, batch)           default: BCE(σ(model(*args, **kwargs)), labels), mean over B
    g     = ∇loss;  if ‖g‖₂ > c: g ← g · c / ‖g‖₂     (‖g‖₂ over every dense and sparse gradient)
    lr_t  = lr · f(t)                       f: warmup + constant/cosine (:mod:`recpeft.schedules`)
    AdamW step with lr_t and decoupled weight decay λ

Optimizers. Parameters that get sparse gradients (rows of a batch's ids only) go to
:class:`~recpeft.optim.LoraAdamW` (lazy Adam on the touched rows); all others to
``torch.optim.AdamW(foreach=True)``. The split is structural, decided before the first step, so a
checkpoint always matches it: the ``lora_A`` tables of recpeft's embedding adapters
(:class:`~recpeft.layers.table.LoraTableLayer`) and the weight of every ``nn.Embedding`` /
``nn.EmbeddingBag`` built with ``sparse=True`` (which covers torchrec's unsharded collections and
their adapter collections). A sparse gradient on any other parameter raises a TypeError naming it.

Epochs. Epoch e visits the rows in the order ``torch.randperm(N, generator=seed_for(seed, e))``,
so a resumed run regenerates it. After each epoch the validation metric (default AUC) decides
early stopping: ``early_stopping_patience`` epochs in a row without improving on the best ends
training, and the best epoch's trainable parameters and buffers are restored at the end. With
``keep_initial`` the starting weights are evaluated first, as epoch −1, and compete with the
epochs: a run where no epoch beats them ends with the model unchanged (``best_epoch == -1``).

Checkpoints. With ``checkpoint_dir`` set, the trainer writes ``step-<global step>.pt`` (atomically)
every ``checkpoint_every_steps`` steps and at each epoch end, and deletes the older ones. A file
holds the trainable parameters and buffers, both optimizers, the run state (epoch, step in the
epoch, the epoch's running loss, best metric and its weights, patience counter, history) and the
torch RNG states (dropout). ``fit(resume=True)`` continues from the latest file; the resumed run
ends bit for bit where an uninterrupted one ends (same device, same threads).

Example::

    trainer = Trainer(model, TrainConfig(epochs=3, lr=3e-3, checkpoint_dir="ckpt"))
    report = trainer.fit(TensorBatches(users, items, labels=clicks), valid_source)
    scores = predict(model, test_source)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .batch import Batch, BatchSource, TensorBatches
from .io import atomic_path
from .layers.table import LoraTableLayer
from .metrics import auc
from .optim import LoraAdamW
from .schedules import LRSchedule, Schedule, warmup_steps_for

CHECKPOINT_FORMAT = 1
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")
# Config fields a resumed run may change: they do not alter the trajectory.
_RESUME_FREE_FIELDS = {"progress", "desc", "checkpoint_dir", "checkpoint_every_steps"}


# ---- configuration and report ---------------------------------------------------------------

@dataclass
class TrainConfig:
    """Settings of a :class:`Trainer` run.

    Args:
        epochs: passes over the training rows (≥ 1).
        batch_size: rows per optimizer step (≥ 1); the last batch of an epoch may be smaller.
        lr: peak learning rate (> 0).
        weight_decay: decoupled weight decay λ (≥ 0) of AdamW.
        warmup_fraction: W = ⌊warmup_fraction · T⌋ linear-warmup steps of the T planned ones, in [0, 1].
        schedule: after warmup, ``constant`` or ``cosine`` down to ``min_lr_ratio · lr``.
        min_lr_ratio: cosine floor in [0, 1].
        clip_grad_norm: max global L2 norm of the gradients (> 0), or None for no clipping.
        early_stopping_patience: epochs without improvement of the validation metric before
            stopping (≥ 1), or None to run every epoch; the best epoch's weights are restored
            whenever a validation source is given.
        keep_initial: evaluate the starting weights before training (epoch −1 of the best-epoch
            choice, not in ``history``); if no epoch improves on them they are restored. Needs a
            validation source to have any effect.
        seed: seeds the torch RNG at the start of a fresh run and every epoch's row order.
        amp: bf16 autocast of the forward pass on CUDA; ignored elsewhere.
        eval_batch_size: rows per forward pass in evaluation (≥ 1).
        checkpoint_dir: folder for checkpoints, or None for none.
        checkpoint_every_steps: also checkpoint every this many optimizer steps (≥ 1), or None.
        progress: show a tqdm bar of trained samples.
        desc: the bar's label.
    """

    epochs: int = 3
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    schedule: Schedule = Schedule.COSINE
    min_lr_ratio: float = 0.0
    clip_grad_norm: float | None = 1.0
    early_stopping_patience: int | None = 2
    keep_initial: bool = False
    seed: int = 0
    amp: bool = True
    eval_batch_size: int = 8192
    checkpoint_dir: str | None = None
    checkpoint_every_steps: int | None = None
    progress: bool = True
    desc: str = "train"

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("seed", self.seed, minimum=0)
        for name in ("early_stopping_patience", "checkpoint_every_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a positive finite number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < math.inf):
            raise ValueError(f"TrainConfig.weight_decay must be a finite number ≥ 0, got {self.weight_decay!r}")
        for name in ("warmup_fraction", "min_lr_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"TrainConfig.{name} must be in [0, 1], got {value!r}")
        if self.clip_grad_norm is not None and not (
                isinstance(self.clip_grad_norm, (int, float)) and 0 < self.clip_grad_norm < math.inf):
            raise ValueError(f"TrainConfig.clip_grad_norm must be a positive finite number or None, "
                             f"got {self.clip_grad_norm!r}")
        try:
            self.schedule = Schedule(self.schedule)
        except ValueError:
            raise ValueError(f"TrainConfig.schedule must be one of {[s.value for s in Schedule]}, "
                             f"got {self.schedule!r}") from None
        for name in ("amp", "progress", "keep_initial"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = str(self.checkpoint_dir)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["schedule"] = self.schedule.value
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "TrainConfig") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown TrainConfig keys {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "TrainConfig JSON") -> "TrainConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a JSON object")
        return cls.from_dict(data, source)


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"TrainConfig.{name} must be an integer ≥ {minimum}, got {value!r}")


@dataclass
class FitReport:
    """What a :meth:`Trainer.fit` call did.

    ``epochs_run``, ``steps``, ``samples``, ``final_loss`` and ``history`` cover the whole run,
    including the part before a resumed checkpoint (``resumed_from_step`` > 0). ``seconds`` is this
    call's wall time; ``samples_per_second`` is the samples this call trained over the seconds it
    spent in training steps (building and moving the batch, forward, backward, clipping,
    optimizer), evaluation and checkpoint writes excluded. ``history`` holds one dict per epoch:
    epoch, train_loss (row-weighted mean of the batch losses), valid_metric (None without a
    validation source), lr (at the epoch's last step). ``best_epoch`` is −1 when ``keep_initial``
    kept the starting weights (``best_metric`` is then their metric). Memory: see :func:`training_state_bytes`;
    ``peak_memory_bytes`` is CUDA's ``max_memory_allocated`` during the call minus the allocation
    at its start (None on CPU).
    """

    epochs_run: int
    steps: int
    samples: int
    seconds: float
    samples_per_second: float
    final_loss: float
    best_metric: float | None
    best_epoch: int | None
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    resumed_from_step: int = 0
    training_state_bytes: int = 0
    peak_memory_bytes: int | None = None


# ---- gradient and memory helpers ------------------------------------------------------------

def sparse_gradient_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``model`` whose gradients are sparse: the ``lora_A`` tables of recpeft's
    embedding adapters and the weights of ``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True``."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, LoraTableLayer):
            found.update((id(p), p) for p in module.lora_A.values())
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
            found[id(module.weight)] = module.weight
    return list(found.values())


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / (‖g‖₂ + 1e-6)) where ‖g‖₂ is the L2 norm of all
    gradients together, dense and sparse (``torch.nn.utils.clip_grad_norm_`` refuses sparse ones).
    A sparse gradient is coalesced first (duplicate rows summed), so its norm is the norm of the
    dense gradient it stands for; ``p.grad`` is replaced by the coalesced, scaled tensor.
    Returns ‖g‖₂ before clipping (float, computed in float32 or wider)."""
    grads = []
    for p in parameters:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad._values())
        else:
            grads.append(p.grad)
    if not grads:
        return 0.0
    squares = torch.stack([g.detach().float().pow(2).sum().to(grads[0].device) for g in grads])
    total = float(squares.sum().sqrt())
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1.0:
        for g in grads:
            g.mul_(coefficient)
    return total


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        parts = (t._indices(), t._values()) if t.is_sparse else (t,)
        for part in parts:
            storage = part.untyped_storage()
            key = (storage.data_ptr(), part.device)
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def training_state_bytes(model: nn.Module, optimizers) -> int:
    """Bytes of the training state: every parameter of ``model`` (trainable and frozen), every
    parameter's ``.grad`` (a sparse one as its indices plus values), and every tensor in the
    optimizers' state (AdamW/LoraAdamW: exp_avg, exp_avg_sq, step). Each storage counts once,
    whole (a view counts its full storage). Not counted: buffers, activations, input batches,
    the allocator's slack — it estimates the state the optimizer choice decides, not a peak."""
    seen: set = set()
    params = list(model.parameters())
    total = _storage_bytes(params, seen)
    total += _storage_bytes([p.grad for p in params if p.grad is not None], seen)
    for optimizer in optimizers:
        for state in optimizer.state.values():
            total += _storage_bytes([v for v in state.values() if isinstance(v, torch.Tensor)], seen)
    return total


def epoch_order(rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The row order of ``epoch``: a permutation of [0, rows) from a generator seeded by
    (seed, epoch), int64 [rows]."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(rows, generator=generator)


# ---- prediction -------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: nn.Module, source, batch_size: int = 8192, **kwargs) -> torch.Tensor:
    """The model's outputs for every row of ``source``, in row order, in eval mode, concatenated
    along dim 0 ([N] for a click model). ``source`` is a :class:`BatchSource`, or (the older call
    style) a tuple of feature tensors [N, ...] sliced into ``model(*features_batch)``; ``kwargs``
    go to every call (tensors in ``kwargs`` of a tuple source are sliced with the features)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(source, (tuple, list)):
        if not source:
            raise ValueError("predict: the feature tuple is empty")
        sliced = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        fixed = {k: v for k, v in kwargs.items() if k not in sliced}
        source = _FeatureRows(tuple(source), sliced)
        kwargs = fixed
    device = _model_device(model)
    model.eval()
    rows = len(source)
    outputs = []
    for begin in range(0, rows, batch_size):
        batch = source.batch(torch.arange(begin, min(begin + batch_size, rows))).to(device)
        outputs.append(model(*batch.args, **batch.kwargs, **kwargs))
    return torch.cat(outputs) if outputs else torch.zeros(0)


class _FeatureRows(TensorBatches):
    """A feature tuple without labels, for :func:`predict`'s older call style."""

    def __init__(self, features: tuple, kwargs: dict):
        super().__init__(*features, labels=torch.zeros(features[0].shape[0]), **kwargs)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


# ---- the trainer ------------------------------------------------------------------------------

def bce_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean binary cross-entropy of the logits ``model(*batch.args, **batch.kwargs)`` [B] (or any
    shape of B elements) against ``batch.labels`` [B] in {0, 1}, computed in float32."""
    logits = model(*batch.args, **batch.kwargs)
    labels = batch.labels
    if logits.numel() != labels.numel():
        raise ValueError(f"the model returned {tuple(logits.shape)} logits for a batch of {labels.numel()} "
                         f"labels; pass a loss_fn for models that do not return one logit per row")
    return nn.functional.binary_cross_entropy_with_logits(logits.reshape(labels.shape).float(), labels.float())


def auc_metric(model: nn.Module, source: BatchSource, batch_size: int = 8192) -> float:
    """AUC of :func:`predict`'s scores against the source's labels."""
    labels = torch.cat([source.batch(torch.arange(b, min(b + batch_size, len(source)))).labels
                        for b in range(0, len(source), batch_size)])
    return auc(predict(model, source, batch_size), labels)


@dataclass
class _RunState:
    """Where a run stands; everything here goes into a checkpoint."""

    epoch: int = 0  # the epoch being run (== epochs when done)
    step_in_epoch: int = 0  # optimizer steps done in that epoch
    global_step: int = 0
    samples: int = 0
    loss_sum: float = 0.0  # Σ loss·rows over the epoch's steps so far
    loss_rows: int = 0
    last_loss: float = float("nan")
    last_lr: float = float("nan")
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list = field(default_factory=list)


class Trainer:
    """Trains ``model``'s trainable parameters with :class:`TrainConfig` (see the module docstring).

    Args:
        model: any ``nn.Module``; freeze what should not train (``get_peft_model`` does it for
            adapters; for dense fine-tuning leave every parameter trainable).
        config: the run's settings.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default :func:`bce_loss`.
        metric_fn: ``metric_fn(model, source) -> float``, the validation metric; default AUC.
            Called in eval mode under ``torch.no_grad()``.
        metric_mode: ``"max"`` (higher is better) or ``"min"``.
        device: where to train; default the model's device (the model is moved there).
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None, *,
                 loss_fn: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
                 metric_fn: Callable[[nn.Module, BatchSource], float] | None = None,
                 metric_mode: str = "max", device: torch.device | str | None = None):
        if metric_mode not in ("max", "min"):
            raise ValueError(f"metric_mode must be 'max' or 'min', got {metric_mode!r}")
        self.config = config if config is not None else TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.model = model.to(self.device)
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to train")
        self.loss_fn = loss_fn or bce_loss
        self.metric_fn = metric_fn
        self.metric_mode = metric_mode
        self.amp = self.config.amp and self.device.type == "cuda"
        self.optimizers: list[torch.optim.Optimizer] = []
        self._dense_params: list[tuple[str, nn.Parameter]] = []

    # ---- optimizers ----------------------------------------------------------------------

    def _build_optimizers(self) -> None:
        sparse_ids = {id(p) for p in sparse_gradient_parameters(self.model)}
        self._dense_params = [(n, p) for n, p in self.trainable if id(p) not in sparse_ids]
        sparse = [p for _, p in self.trainable if id(p) in sparse_ids]
        decay, lr = self.config.weight_decay, self.config.lr
        self.optimizers = []
        if self._dense_params:
            self.optimizers.append(torch.optim.AdamW([p for _, p in self._dense_params], lr=lr,
                                                     weight_decay=decay, foreach=True))
        if sparse:
            self.optimizers.append(LoraAdamW(sparse, lr=lr, weight_decay=decay))

    def _set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    # ---- one step ------------------------------------------------------------------------

    def _step(self, batch: Batch, lr: float, check_sparse: bool) -> float:
        self._set_lr(lr)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                             f"{tuple(getattr(loss, 'shape', ()))}")
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the training loss is {value} (lr {lr:.3g}); lower lr or check the inputs")
        if check_sparse:
            for name, p in self._dense_params:
                if p.grad is not None and p.grad.is_sparse:
                    raise TypeError(f"parameter {name} got a sparse gradient but is not an embedding with "
                                    f"sparse=True or a LoRA table adapter; torch AdamW cannot step it")
        if self.config.clip_grad_norm is not None:
            clip_grad_norm([p for _, p in self.trainable], self.config.clip_grad_norm)
        for optimizer in self.optimizers:
            optimizer.step()
        return value

    # ---- evaluation ----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, source: BatchSource) -> float:
        """The validation metric of the model on ``source`` (eval mode; the model stays in it)."""
        if len(source) == 0:
            raise ValueError("the validation source is empty")
        self.model.eval()
        if self.metric_fn is not None:
            return float(self.metric_fn(self.model, source))
        return auc_metric(self.model, source, self.config.eval_batch_size)

    def _checked_metric(self, valid: BatchSource, when: str) -> float:
        metric = self.evaluate(valid)
        if math.isnan(metric):
            raise ValueError(f"the validation metric is NaN {when} (for AUC: does the validation source hold "
                             f"both labels?)")
        return metric

    def _improves(self, metric: float, best: float | None) -> bool:
        if best is None:
            return True
        return metric > best if self.metric_mode == "max" else metric < best

    # ---- model state -----------------------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable parameters and of every buffer, by name (on the CPU so
        that the best-weights snapshot adds nothing to device memory)."""
        state = {n: p.detach().to("cpu", copy=True) for n, p in self.trainable}
        state.update({f"buffer:{n}": b.detach().to("cpu", copy=True) for n, b in self.model.named_buffers()})
        return state

    @torch.no_grad()
    def _load_trainable_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        targets = {n: p for n, p in self.trainable}
        targets.update({f"buffer:{n}": b for n, b in self.model.named_buffers()})
        if set(state) != set(targets):
            missing, extra = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
            raise ValueError(f"{source} does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, tensor in state.items():
            if tensor.shape != targets[name].shape:
                raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)} but the model's is "
                                 f"{tuple(targets[name].shape)}")
            targets[name].copy_(tensor)

    # ---- checkpoints -----------------------------------------------------------------------

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint with the highest step in ``config.checkpoint_dir``, or None."""
        if self.config.checkpoint_dir is None or not Path(self.config.checkpoint_dir).is_dir():
            return None
        found = [(int(m.group(1)), p) for p in Path(self.config.checkpoint_dir).iterdir()
                 if (m := _CHECKPOINT_NAME.match(p.name))]
        return max(found)[1] if found else None

    def _save_checkpoint(self, run: _RunState, best_state: dict | None, rows: int) -> None:
        folder = Path(self.config.checkpoint_dir)
        path = folder / f"step-{run.global_step:09d}.pt"
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "train_rows": rows,
            "run": dataclasses.asdict(run),
            "model": self._trainable_state(),
            "best_model": best_state,
            "optimizers": [o.state_dict() for o in self.optimizers],
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        for old in folder.iterdir():
            if _CHECKPOINT_NAME.match(old.name) and old != path:
                old.unlink(missing_ok=True)

    def _load_checkpoint(self, path: Path, rows: int) -> tuple[_RunState, dict | None]:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: checkpoint format {payload.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        saved = payload["config"]
        for key, value in self.config.to_dict().items():
            if key not in _RESUME_FREE_FIELDS and saved.get(key) != value:
                raise ValueError(f"{path} was written with {key}={saved.get(key)!r} but this run has "
                                 f"{key}={value!r}; use another checkpoint_dir or resume=False")
        if payload["train_rows"] != rows:
            raise ValueError(f"{path} was written for {payload['train_rows']} training rows but the source has {rows}")
        self._load_trainable_state(payload["model"], str(path))
        if len(payload["optimizers"]) != len(self.optimizers):
            raise ValueError(f"{path} holds {len(payload['optimizers'])} optimizer states, this model needs "
                             f"{len(self.optimizers)}")
        for optimizer, state in zip(self.optimizers, payload["optimizers"]):
            optimizer.load_state_dict(state)
        torch.set_rng_state(payload["rng"].cpu())
        if payload["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in payload["cuda_rng"]])
        return _RunState(**payload["run"]), payload["best_model"]

    # ---- the loop ----------------------------------------------------------------------------

    def fit(self, train: BatchSource, valid: BatchSource | None = None, *, resume: bool = True) -> FitReport:
        """Train on ``train``; evaluate on ``valid`` after every epoch (early stopping, best
        weights restored). With ``resume`` and a checkpoint in ``config.checkpoint_dir``, continue
        from it. Leaves the model in eval mode."""
        config = self.config
        rows = len(train)
        if rows == 0:
            raise ValueError("the training source is empty")
        if valid is not None and len(valid) == 0:
            raise ValueError("the validation source is empty")
        steps_per_epoch = math.ceil(rows / config.batch_size)
        total_steps = config.epochs * steps_per_epoch
        schedule = LRSchedule(total_steps, warmup_steps_for(total_steps, config.warmup_fraction),
                              config.schedule, config.min_lr_ratio)
        self._build_optimizers()
        run, best_state = _RunState(), None
        torch.manual_seed(config.seed)
        checkpoint = self.latest_checkpoint() if resume else None
        if checkpoint is not None:
            run, best_state = self._load_checkpoint(checkpoint, rows)
        elif config.keep_initial and valid is not None:   # a fresh run: the starting weights are epoch -1
            run.best_metric, run.best_epoch = self._checked_metric(valid, "before training"), -1
            best_state = self._trainable_state()
        resumed_from, samples_before = run.global_step, run.samples
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            memory_at_start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start, train_seconds = time.perf_counter(), 0.0
        bar = tqdm(total=config.epochs * rows, initial=min(run.samples, config.epochs * rows), desc=config.desc,
                   unit="samples", disable=not config.progress, leave=False)
        with bar:
            while run.epoch < config.epochs and not run.stopped_early:
                self.model.train()
                order = epoch_order(rows, config.seed, run.epoch)
                for step in range(run.step_in_epoch, steps_per_epoch):
                    index = order[step * config.batch_size:(step + 1) * config.batch_size]
                    tick = time.perf_counter()
                    batch = train.batch(index).to(self.device)
                    run.last_lr = config.lr * schedule(run.global_step)
                    run.last_loss = self._step(batch, run.last_lr, check_sparse=run.global_step == resumed_from)
                    train_seconds += time.perf_counter() - tick
                    run.step_in_epoch, run.global_step = step + 1, run.global_step + 1
                    run.samples += len(index)
                    run.loss_sum += run.last_loss * len(index)
                    run.loss_rows += len(index)
                    bar.update(len(index))
                    every = config.checkpoint_every_steps
                    if (config.checkpoint_dir and every and run.global_step % every == 0
                            and run.step_in_epoch < steps_per_epoch):
                        self._save_checkpoint(run, best_state, rows)
                best_state = self._end_epoch(run, valid, best_state)
                last = run.history[-1]
                bar.set_postfix(epoch=last["epoch"], loss=f"{last['train_loss']:.4f}",
                                valid=None if last["valid_metric"] is None else f"{last['valid_metric']:.4f}")
                if config.checkpoint_dir:
                    self._save_checkpoint(run, best_state, rows)
        if best_state is not None:
            self._load_trainable_state(best_state, "the best epoch's weights")
        self.model.eval()
        seconds = time.perf_counter() - start
        return FitReport(
            epochs_run=len(run.history), steps=run.global_step, samples=run.samples, seconds=seconds,
            samples_per_second=(run.samples - samples_before) / max(train_seconds, 1e-9),
            final_loss=run.last_loss, best_metric=run.best_metric, best_epoch=run.best_epoch,
            stopped_early=run.stopped_early, history=[dict(h) for h in run.history],
            resumed_from_step=resumed_from, training_state_bytes=training_state_bytes(self.model, self.optimizers),
            peak_memory_bytes=(torch.cuda.max_memory_allocated(self.device) - memory_at_start) if cuda else None,
        )

    def _end_epoch(self, run: _RunState, valid: BatchSource | None, best_state: dict | None) -> dict | None:
        """Record the epoch in the history, evaluate, update the best weights and the patience
        counter, advance to the next epoch. Returns the best weights so far."""
        metric = None
        if valid is not None:
            metric = self._checked_metric(valid, f"after epoch {run.epoch}")
            if self._improves(metric, run.best_metric):
                run.best_metric, run.best_epoch, run.bad_epochs = metric, run.epoch, 0
                best_state = self._trainable_state()
            else:
                run.bad_epochs += 1
                patience = self.config.early_stopping_patience
                run.stopped_early = patience is not None and run.bad_epochs >= patience
        run.history.append({"epoch": run.epoch, "train_loss": run.loss_sum / max(run.loss_rows, 1),
                            "valid_metric": metric, "lr": run.last_lr})
        run.epoch, run.step_in_epoch, run.loss_sum, run.loss_rows = run.epoch + 1, 0, 0.0, 0
        return best_state

