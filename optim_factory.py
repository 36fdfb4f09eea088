"""Optimizers through timm's factory, which already builds MAE's parameter groups.

timm's ``create_optimizer_v2`` puts biases, norms and the names in ``model.no_weight_decay()``
(cls/mask tokens, position embeddings) in a group without weight decay, and with
``layer_decay`` it scales each block's learning rate by ``decay ** (num_layers + 1 - layer_id)``
through the group's ``lr_scale``, which ``utils.set_learning_rate`` honours.
"""
import argparse

import torch
from timm.optim import create_optimizer_v2, optimizer_kwargs

FUSED_CAPABLE = ("adam", "adamw")


def add_optimizer_args(parser: argparse.ArgumentParser, weight_decay: float, betas: tuple) -> None:
    """The optimizer flags shared by pretraining and finetuning."""
    group = parser.add_argument_group("optimizer")
    group.add_argument("--opt", default="adamw", type=str, help="timm optimizer name (adamw, sgd, lars, lamb, ...)")
    group.add_argument("--opt_eps", default=1e-8, type=float, help="optimizer epsilon")
    group.add_argument("--opt_betas", default=list(betas), type=float, nargs="+", help="Adam betas")
    group.add_argument("--momentum", default=0.9, type=float, help="momentum of SGD-like optimizers")
    group.add_argument("--weight_decay", default=weight_decay, type=float, help="decoupled weight decay")


def create_optimizer(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of ``args.opt`` with MAE's groups; fused kernels for Adam(W) on CUDA."""
    kwargs = optimizer_kwargs(args)
    if device.type == "cuda" and args.opt.lower() in FUSED_CAPABLE:
        kwargs["fused"] = True
    return create_optimizer_v2(model, **kwargs)
