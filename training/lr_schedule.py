"""The learning-rate schedule, as MAE's ``util/lr_sched.py``: a pure function of the fractional
epoch, applied to every parameter group scaled by its layer-decay ``lr_scale``."""
import math
from dataclasses import dataclass

import torch

from training.settings import Settings


@dataclass(frozen=True)
class Schedule(Settings):
    """``--lr`` (resolved from ``--blr``), ``--min_lr``, ``--warmup_epochs`` and ``--epochs``."""

    lr: float
    min_lr: float
    warmup_epochs: float
    epochs: int


def lr_at(epoch: float, schedule: Schedule) -> float:
    """Linear warmup to ``lr``, then a half-cosine to ``min_lr``; ``epoch`` is fractional."""
    if epoch < schedule.warmup_epochs:
        return schedule.lr * epoch / schedule.warmup_epochs
    progress = (epoch - schedule.warmup_epochs) / max(schedule.epochs - schedule.warmup_epochs, 1e-8)
    return schedule.min_lr + (schedule.lr - schedule.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply ``lr`` to every group, scaled by the group's layer-decay ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def max_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest group lr: the schedule's value, which layer decay only scales down."""
    return max(group["lr"] for group in optimizer.param_groups)
