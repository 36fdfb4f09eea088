"""An optimizer's saved state loaded without its kernel choice: a run keeps the fused (or foreach)
kernel it chose, whatever the checkpoint's run used."""
from typing import Any, Dict, List, Mapping

import torch

OPTIMIZER_KERNEL_KEYS = ("fused", "foreach")


def optimizer_kernels(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """Each group's kernel choice (fused, foreach), which a loaded state must not override."""
    return [{key: group[key] for key in OPTIMIZER_KERNEL_KEYS if key in group} for group in optimizer.param_groups]


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """The checkpoint's moments and hyperparameters with this run's kernel choice.

    ``Optimizer.load_state_dict`` takes every group setting from the checkpoint, ``fused`` too, so a
    state saved unfused (or on another device) would silently switch the fused kernel off here.
    """
    groups = [{**saved, **kernel} for saved, kernel in zip(state["param_groups"], optimizer_kernels(optimizer))]
    optimizer.load_state_dict({**state, "param_groups": groups})
