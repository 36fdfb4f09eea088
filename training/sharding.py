"""Training past one GPU's memory: FSDP2 (``--fsdp``) shards every transformer block of the
encoder and decoder, and the rest of the model, over the ranks, so each holds 1/W of the weights,
gradients and AdamW state and gathers a block's weights only while it runs; activation
checkpointing (``--grad_checkpointing``) recomputes each block's activations in the backward pass
instead of keeping them. When to use which: docs/memory.md.
"""
import itertools
import warnings

import torch
import torch.distributed as dist
from timm.models.vision_transformer import Block
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from training.precision import AMP_DTYPES
from utils import UsageError, get_world_size

FORWARD_METHODS = ("reconstruct", "encode")  # called outside forward (pictures, evaluation): FSDP gathers for them too


def check_sharding(*, fsdp: bool, amp: str) -> None:
    """``--fsdp`` with fp16 would need a sharded grad scaler: bf16 (or none) it is."""
    if fsdp and amp == "fp16":
        raise UsageError("--fsdp runs with --amp bf16 or none (fp16 would need a sharded grad scaler); "
                         "bf16 needs no loss scaling")


def mixed_precision(amp: str) -> MixedPrecisionPolicy:
    """Weights gathered in the compute dtype of ``--amp`` (bf16, or fp32), gradients reduced in fp32."""
    return MixedPrecisionPolicy(param_dtype=AMP_DTYPES.get(amp), reduce_dtype=torch.float32)


def shard_model(model: torch.nn.Module, device: torch.device, amp: str) -> torch.nn.Module:
    """``fully_shard`` each timm ``Block`` (encoder and decoder), then the root, which holds the
    embeddings, norms and heads, on every rank (a collective); the optimizer must be made
    afterwards, from the sharded weights.

    Every rank starts from rank 0's weights, as DDP makes it (each rank initializes from a seed of
    its own), since each keeps only its shard of what it has.
    """
    if get_world_size() > 1:
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            dist.broadcast(tensor.data, src=0)
    # nn.Linear hands back its 3-D output as a view of a 2-D one, which FSDP2 warns may lose its
    # backward hook to an in-place op; nothing here changes a model's output in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (get_world_size(),))
    policy = mixed_precision(amp)
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model
