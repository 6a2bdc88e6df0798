"""Where a :class:`~recpeft.train.Trainer` run stands, and its checkpoint files.

State. :class:`RunState` holds the loop's counters (epoch, step in the epoch, global step, the
epoch's running loss Σ loss·rows and its rows), the best validation metric, its epoch and the
patience counter, and the per-epoch history. The model's part is its trainable parameters and
every buffer, copied to the CPU by name (:func:`trainable_state`): the same snapshot serves as the
best epoch's weights and as a checkpoint's model.

Checkpoints. With ``checkpoint_dir`` set, the trainer writes ``step-<global step>.pt`` (atomically)
every ``checkpoint_every_steps`` steps and at each epoch end, and deletes all but the previous
one (kept for a resume to fall back to when the newest is truncated or corrupt). A file
holds the config, the number of training rows, the trainable parameters and buffers, both
optimizers, the run state (epoch, step in the epoch, the epoch's running loss, best metric and its
weights, patience counter, history) and the torch RNG states (dropout). ``fit(resume=True)``
continues from the latest readable file (:func:`resume_from`); the resumed run ends bit for bit
where an uninterrupted one ends (same device, same threads). A file written with different settings (other than those in
:data:`RESUME_FREE_FIELDS`) or for another number of training rows is refused with a ValueError;
a file of an older release, whose config lacks a field added since, counts as written with that
field's default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from recpeft.utils.atomic import atomic_path, recover_folder
from recpeft.utils.validation import check_state_keys, check_state_shapes

from .config import TrainConfig
from .optimizers import NamedParameters

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")
# Config fields a resumed run may change: they do not alter the trajectory.
RESUME_FREE_FIELDS = frozenset({"progress", "desc", "checkpoint_dir", "checkpoint_every_steps", "stop_after_epochs"})


@dataclass
class RunState:
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


# ---- the model's part ---------------------------------------------------------------------------


def trainable_state(model: nn.Module, trainable: NamedParameters) -> dict[str, torch.Tensor]:
    """CPU copies of the ``trainable`` parameters and of every buffer of ``model``, by name (buffers
    as ``buffer:<name>``; on the CPU so that a best-weights snapshot adds nothing to device memory)."""
    state = {n: p.detach().to("cpu", copy=True) for n, p in trainable}
    state.update({f"buffer:{n}": b.detach().to("cpu", copy=True) for n, b in model.named_buffers()})
    return state


@torch.no_grad()
def load_trainable_state(
    model: nn.Module, trainable: NamedParameters, state: dict[str, torch.Tensor], source: str
) -> None:
    """Copy ``state`` (from :func:`trainable_state`) into ``model`` in place. The names must be
    exactly those of ``trainable`` and the model's buffers, with the same shapes; otherwise a
    ValueError names ``source`` and the mismatch."""
    targets = {n: p for n, p in trainable}
    targets.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    check_state_keys(state, targets, where=f"{source} does not fit the model")
    check_state_shapes(state, targets, where=source)
    for name, tensor in state.items():
        targets[name].copy_(tensor)


# ---- checkpoint files -----------------------------------------------------------------------------


class CheckpointUnreadable(ValueError):
    """A checkpoint file that is truncated, corrupt (its sha256 does not match) or not one of ours."""


class CheckpointFallbackWarning(UserWarning):
    """Resume skipped an unreadable checkpoint for the one before it."""


def checkpoints(folder: str | Path | None) -> list[Path]:
    """The folder's ``step-<n>.pt`` files, highest n first ([] when no folder or none there)."""
    if folder is None or not Path(folder).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(folder).iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(folder: str | Path | None) -> Path | None:
    """The ``step-<n>.pt`` file with the highest n in ``folder``, or None (no folder, or none there)."""
    found = checkpoints(folder)
    return found[0] if found else None


def save_checkpoint(
    folder: str | Path,
    config: TrainConfig,
    rows: int,
    run: RunState,
    model: nn.Module,
    trainable: NamedParameters,
    best_state: dict | None,
    optimizers: list[torch.optim.Optimizer],
) -> Path:
    """Write ``folder/step-<run.global_step>.pt`` atomically (see the module docstring for what it
    holds; the file is ``{"sha256", "payload"}``: the serialised payload and its hash), then delete
    the folder's checkpoints older than the previous one — the previous one stays for a resume to
    fall back to — and the temporary files of killed writes. Returns the written path."""
    folder = Path(folder)
    path = folder / f"step-{run.global_step:09d}.pt"
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "train_rows": rows,
        "run": dataclasses.asdict(run),
        "model": trainable_state(model, trainable),
        "best_model": best_state,
        "optimizers": [o.state_dict() for o in optimizers],
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    recover_folder(folder)
    with atomic_path(path) as tmp:
        torch.save({"sha256": hashlib.sha256(data).hexdigest(), "payload": data}, tmp)
    for old in checkpoints(folder)[2:]:
        old.unlink(missing_ok=True)
    return path


_PAYLOAD_KEYS = ("format", "config", "train_rows", "run", "model", "best_model", "optimizers", "rng", "cuda_rng")


def read_checkpoint(path: Path) -> dict:
    """The payload of checkpoint ``path``, its sha256 checked (files of the older layout, a bare
    payload, are read unchecked); CheckpointUnreadable naming ``path`` when it is truncated,
    corrupt or not a checkpoint."""
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(outer, dict) and set(outer) == {"sha256", "payload"}:
            if hashlib.sha256(outer["payload"]).hexdigest() != outer["sha256"]:
                raise CheckpointUnreadable(f"{path} is corrupt: its data does not match its recorded sha256")
            outer = torch.load(io.BytesIO(outer["payload"]), map_location="cpu", weights_only=True)
    except CheckpointUnreadable:
        raise
    except Exception as exc:  # torch.load raises many kinds on a truncated or garbled file
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointUnreadable(f"{path} is truncated or corrupt ({message})") from None
    if not isinstance(outer, dict) or any(key not in outer for key in _PAYLOAD_KEYS):
        raise CheckpointUnreadable(f"{path} is not a recpeft training checkpoint (missing entries)")
    if outer["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {outer['format']!r}, expected {CHECKPOINT_FORMAT}")
    return outer


def load_checkpoint(
    path: Path,
    config: TrainConfig,
    rows: int,
    model: nn.Module,
    trainable: NamedParameters,
    optimizers: list[torch.optim.Optimizer],
    payload: dict | None = None,
) -> tuple[RunState, dict | None]:
    """Restore the run in ``path`` (or its already read ``payload``) into ``model``, ``optimizers``
    and the torch RNGs, after checking that it was written with ``config`` (up to
    :data:`RESUME_FREE_FIELDS`), for ``rows`` training rows and the same number of optimizers
    (ValueError naming ``path`` otherwise). Returns the run state and the best weights so far
    (None if none)."""
    payload = read_checkpoint(path) if payload is None else payload
    # A field newer than the file ran at its default: each new field's default is what the
    # release before it did (stop on AUC, any gain counts, the starting weights not kept).
    saved = TrainConfig().to_dict() | payload["config"]
    for key, value in config.to_dict().items():
        if key not in RESUME_FREE_FIELDS and saved.get(key) != value:
            raise ValueError(
                f"{path} was written with {key}={saved.get(key)!r} but this run has "
                f"{key}={value!r}; use another checkpoint_dir or resume=False"
            )
    if payload["train_rows"] != rows:
        raise ValueError(f"{path} was written for {payload['train_rows']} training rows but the source has {rows}")
    load_trainable_state(model, trainable, payload["model"], str(path))
    if len(payload["optimizers"]) != len(optimizers):
        raise ValueError(
            f"{path} holds {len(payload['optimizers'])} optimizer states, this model needs {len(optimizers)}"
        )
    for optimizer, state in zip(optimizers, payload["optimizers"]):
        optimizer.load_state_dict(state)
    torch.set_rng_state(payload["rng"].cpu())
    if payload["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in payload["cuda_rng"]])
    return RunState(**payload["run"]), payload["best_model"]


def resume_from(
    folder: str | Path | None,
    config: TrainConfig,
    rows: int,
    model: nn.Module,
    trainable: NamedParameters,
    optimizers: list[torch.optim.Optimizer],
) -> tuple[Path, RunState, dict | None] | None:
    """Resume from the newest readable checkpoint in ``folder`` (None when there is none): an
    unreadable newest file (truncated, corrupt) is skipped for the one before it with a
    CheckpointFallbackWarning naming it; when every file is unreadable a ValueError names them.
    Returns the file used, the run state and the best weights so far."""
    found = checkpoints(folder)
    failures = []
    for path in found:
        try:
            payload = read_checkpoint(path)
        except CheckpointUnreadable as exc:
            failures.append(str(exc))
            continue
        if failures:
            warnings.warn(f"{'; '.join(failures)}; resuming from {path} instead", CheckpointFallbackWarning, 2)
        return (path, *load_checkpoint(path, config, rows, model, trainable, optimizers, payload=payload))
    if failures:
        raise ValueError(f"no readable checkpoint in {folder}: {'; '.join(failures)}; pass resume=False to start over")
    return None
