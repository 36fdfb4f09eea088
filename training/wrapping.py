"""Model wrapping, in one place: ``wrap_model`` turns the model into what the loop trains (FSDP2
shards with ``--fsdp``, then ``torch.compile`` with ``--compile``, then DDP on several processes
unless sharded), and ``unwrap_model`` gets the model back for its weights, its loss and its
pictures. The wrappers share the parameters, so an optimizer built on either sees the same tensors.
"""
import argparse

import torch
from torch.distributed.fsdp import FSDPModule

from training.sharding import shard_model


def wrap_model(model: torch.nn.Module, device: torch.device, args: argparse.Namespace) -> torch.nn.Module:
    """The model as the loop trains it; call it on every rank, before the optimizer is made (a
    collective: sharding and DDP each start every rank from rank 0's weights).

    ``model`` must already be on ``device``. With ``--fsdp`` it is sharded in place, so the
    optimizer must be built from the returned (or the same) model's parameters afterwards.
    """
    if args.fsdp:
        shard_model(model, device, args.amp)
    wrapped = torch.compile(model) if args.compile else model
    if args.fsdp or not args.distributed:  # FSDP reduces its own gradients
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
