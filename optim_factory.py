"""Optimizers through timm's factory, which already builds MAE's parameter groups.

timm's ``create_optimizer_v2`` puts biases, norms and the names in ``model.no_weight_decay()``
(cls/mask tokens, position embeddings) in a group without weight decay, and with
``layer_decay`` it scales each block's learning rate by ``decay ** (num_layers + 1 - layer_id)``
through the group's ``lr_scale``, which ``engine.set_learning_rate`` honours.
"""
import argparse

import torch
from timm.optim import Lars, create_optimizer_v2, optimizer_kwargs

FUSED_CAPABLE = ("adam", "adamw")
FUSED_DEVICES = ("cpu", "cuda")


def add_optimizer_args(parser: argparse.ArgumentParser, weight_decay: float, betas: tuple) -> None:
    """The optimizer flags shared by pretraining and finetuning."""
    group = parser.add_argument_group("optimizer")
    group.add_argument("--opt", default="adamw", type=str, help="timm optimizer name (adamw, sgd, lars, lamb, ...)")
    group.add_argument("--opt_eps", default=1e-8, type=float, help="optimizer epsilon")
    group.add_argument("--opt_betas", default=list(betas), type=float, nargs="+", help="Adam betas")
    group.add_argument("--momentum", default=0.9, type=float, help="momentum of SGD-like optimizers")
    group.add_argument("--weight_decay", default=weight_decay, type=float, help="decoupled weight decay")


def create_optimizer(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of ``args.opt`` with MAE's groups; Adam(W) runs torch's fused kernel, one pass
    over the parameters instead of a dozen (benchmarks/RESULTS.md)."""
    kwargs = optimizer_kwargs(args)
    if device.type in FUSED_DEVICES and args.opt.lower() in FUSED_CAPABLE:
        kwargs["fused"] = True
    return create_optimizer_v2(model, **kwargs)


def create_lars(model: torch.nn.Module, lr: float, weight_decay: float = 0.0, momentum: float = 0.9) -> Lars:
    """MAE's linear-probe LARS (trust coefficient 0.001) over the trainable parameters.

    As in MAE, only weight matrices get the layer-wise trust ratio and the weight decay; biases and
    other 1-D parameters take plain SGD-momentum steps. timm's ``Lars`` adapts a group only when
    its weight decay is non-zero or ``always_adapt`` is set, hence the two groups.
    """
    trainable = [param for param in model.parameters() if param.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim > 1], "always_adapt": True, "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim <= 1], "always_adapt": False, "weight_decay": 0.0},
    ]
    return Lars([group for group in groups if group["params"]], lr=lr, momentum=momentum)
