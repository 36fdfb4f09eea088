"""Optimizers with MAE's parameter groups, built through timm's factory.

Pretraining takes timm's groups, which are MAE's: biases, norms and the names in
``model.no_weight_decay()`` (cls/mask tokens, position embeddings) without weight decay. With
``--layer_decay`` (finetuning) the groups follow MAE's ``get_layer_id_for_vit`` exactly: the
embeddings are layer 0, block i layer i + 1, everything after the blocks (the final norm,
``fc_norm``, the head) layer L + 1, whose lr is scaled by ``decay ** (L + 1 - layer)`` through the
group's ``lr_scale`` (``training.lr_schedule.set_learning_rate`` honours it). timm's own grouping gives the final
norm ``decay`` instead of 1, so it is not used. The linear probe's LARS is MAE's ``util/lars.py``,
which timm's ``Lars`` is not when weight decay is on.
"""
import argparse
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from timm.optim import create_optimizer_v2, optimizer_kwargs

from training.settings import Settings

FUSED_CAPABLE = ("adam", "adamw")
FUSED_DEVICES = ("cpu", "cuda")
EMBEDDINGS = ("cls_token", "pos_embed")  # layer 0 with patch_embed.*


def add_optimizer_args(parser: argparse.ArgumentParser, weight_decay: float, betas: tuple) -> None:
    """The optimizer flags shared by pretraining and finetuning."""
    group = parser.add_argument_group("optimizer")
    group.add_argument("--opt", default="adamw", type=str, help="timm optimizer name (adamw, sgd, lars, lamb, ...)")
    group.add_argument("--opt_eps", default=1e-8, type=float, help="optimizer epsilon")
    group.add_argument("--opt_betas", default=list(betas), type=float, nargs="+", help="Adam betas")
    group.add_argument("--momentum", default=0.9, type=float, help="momentum of SGD-like optimizers")
    group.add_argument("--weight_decay", default=weight_decay, type=float, help="decoupled weight decay")


def layer_id(name: str, num_layers: int) -> int:
    """MAE's ``get_layer_id_for_vit``: 0 for the embeddings, i + 1 for block i, ``num_layers``
    (blocks + 1) for everything after the blocks."""
    if name in EMBEDDINGS or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def layer_decay_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> List[Dict[str, Any]]:
    """MAE's ``param_groups_lrd``: one group per (layer, decayed or not), with its ``lr_scale``;
    1-D parameters and ``model.no_weight_decay()`` take no weight decay."""
    num_layers = len(model.blocks) + 1
    skip = set(model.no_weight_decay())
    groups: Dict[tuple, Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = not (param.ndim == 1 or name in skip)
        layer = layer_id(name, num_layers)
        group = groups.setdefault((layer, decayed), {
            "params": [], "weight_decay": weight_decay if decayed else 0.0,
            "lr_scale": layer_decay ** (num_layers - layer),
        })
        group["params"].append(param)
    return list(groups.values())


@dataclass(frozen=True)
class OptimizerSettings(Settings):
    """The optimizer flags and the resolved ``lr``, named as timm's ``optimizer_kwargs`` reads them;
    ``layer_decay`` only for finetuning."""

    opt: str
    lr: float
    weight_decay: float
    momentum: float = 0.9
    opt_eps: Optional[float] = None
    opt_betas: Optional[Sequence[float]] = None
    layer_decay: Optional[float] = None


def create_optimizer(
    optimizer: OptimizerSettings, model: torch.nn.Module, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer of ``--opt`` with MAE's groups; Adam(W) runs torch's fused kernel, one pass
    over the parameters instead of a dozen (benchmarks/RESULTS.md)."""
    kwargs = optimizer_kwargs(optimizer)
    layer_decay = kwargs.pop("layer_decay", None)
    if device.type in FUSED_DEVICES and optimizer.opt.lower() in FUSED_CAPABLE:
        kwargs["fused"] = True
    if layer_decay is None:
        return create_optimizer_v2(model, **kwargs)
    return create_optimizer_v2(layer_decay_groups(model, kwargs["weight_decay"], layer_decay), **kwargs)


class MaeLars(torch.optim.Optimizer):
    """LARS as MAE's ``util/lars.py`` (its linear probe): for every weight matrix the step is the
    gradient plus the decay term, scaled by ``trust_coefficient * |w| / |g + decay * w|``; biases and
    other 1-D parameters take plain momentum steps, without decay. No epsilon, no dampening."""

    def __init__(self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim > 1:  # not a bias or a norm's scale
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(param), torch.norm(update)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(update_norm > 0, group["trust_coefficient"] * param_norm / update_norm, one)
                    update = update.mul(torch.where(param_norm > 0, trust, one))
                momentum = self.state[param].setdefault("mu", torch.zeros_like(param))
                momentum.mul_(group["momentum"]).add_(update)
                param.add_(momentum, alpha=-group["lr"])


def create_lars(model: torch.nn.Module, lr: float, weight_decay: float = 0.0, momentum: float = 0.9) -> MaeLars:
    """MAE's linear-probe LARS (trust coefficient 0.001) over the trainable parameters."""
    return MaeLars([param for param in model.parameters() if param.requires_grad], lr=lr,
                   weight_decay=weight_decay, momentum=momentum)
