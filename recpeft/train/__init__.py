"""Training: the Trainer loop for LoRA adapters and dense fine-tuning alike, its settings and
report (``config``), the optimizer split and gradient clipping (``optimizers``, with the
sparse-row Adam ``lora_adamw``), learning-rate schedules, resumable run state, memory
accounting and the repeated-holdout choice of epochs for small segments (``repeated_holdout``).

May import: ``recpeft.datasets`` (the Batch / BatchSource it consumes), ``recpeft.metrics``,
``recpeft.peft``, ``recpeft.layers``, ``recpeft.kernels``, ``recpeft.utils``. Nothing here
imports ``recpeft.apps`` or ``recpeft.cli``.
"""

from .config import FitReport, StopMetric, TrainConfig
from .lora_adamw import LoraAdamW
from .memory import training_state_bytes
from .optimizers import build_optimizers, clip_grad_norm, sparse_gradient_parameters
from .repeated_holdout import RepeatedHoldoutReport, chosen_epoch, fit_with_repeated_holdouts, holdout_indices
from .schedules import LRSchedule, Schedule, warmup_steps_for
from .trainer import Trainer, auc_metric, bce_loss, epoch_order, predict

__all__ = [
    "FitReport",
    "LRSchedule",
    "LoraAdamW",
    "RepeatedHoldoutReport",
    "Schedule",
    "StopMetric",
    "TrainConfig",
    "Trainer",
    "auc_metric",
    "bce_loss",
    "build_optimizers",
    "chosen_epoch",
    "clip_grad_norm",
    "epoch_order",
    "fit_with_repeated_holdouts",
    "holdout_indices",
    "predict",
    "sparse_gradient_parameters",
    "training_state_bytes",
    "warmup_steps_for",
]
