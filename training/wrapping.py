"""Model wrapping, in one place: ``wrap_model`` turns the model into what the loop trains (FSDP2
shards with ``--fsdp``, then ``torch.compile`` with ``--compile``, then DDP on several processes
unless sharded), and ``unwrap_model`` gets the model back for its weights, its loss and its
pictures. The wrappers share the parameters, so an optimizer built on either sees the same tensors.
"""
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FSDPModule

from training.settings import Settings
from training.sharding import check_sharding, shard_model


@dataclass(frozen=True)
class Wrapping(Settings):
    """``--fsdp``, ``--compile``, the precision FSDP gathers weights in, and whether DDP is needed."""

    fsdp: bool = False
    compile: bool = False
    amp: str = "none"
    distributed: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sharding(fsdp=self.fsdp, amp=self.amp)


def wrap_model(model: torch.nn.Module, device: torch.device, wrapping: Wrapping) -> torch.nn.Module:
    """The model as the loop trains it; call it on every rank, before the optimizer is made (a
    collective: sharding and DDP each start every rank from rank 0's weights).

    ``model`` must already be on ``device``. With ``--fsdp`` it is sharded in place, so the
    optimizer must be built from the returned (or the same) model's parameters afterwards.
    """
    if wrapping.fsdp:
        shard_model(model, device, wrapping.amp)
    wrapped = torch.compile(model) if wrapping.compile else model
    if wrapping.fsdp or not wrapping.distributed:  # FSDP reduces its own gradients
        return wrapped
    return torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=[device] if device.type == "cuda" else None)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP and ``torch.compile`` wrappers (a sharded model is its own module)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``wrap_model`` sharded the model (``--fsdp``): its checkpoints are folders of shards."""
    return isinstance(unwrap_model(model), FSDPModule)
