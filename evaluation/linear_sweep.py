"""The fast linear probe (``run_linear_probe.py --protocol sweep``), after DINOv2's linear evaluation:
over features extracted once, a grid of linear heads, each with its own learning rate and weight
decay, trained together in one pass per step; the head is chosen on a seeded held-out tenth of the
training split, never on the validation set, and its validation top-1 is the result.

Features are standardized with the training part's mean and standard deviation (what the paper's
non-affine BatchNorm does at evaluation). Each head is a linear layer trained by SGD with momentum
0.9 and a cosine schedule on the cross-entropy; on several processes each rank trains its share
of the heads on all the features.
"""
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from utils import all_gather_objects, get_rank, get_world_size, raise_on_all_ranks

LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)
HELD_OUT = 0.1  # of the training split, to choose the head on
MOMENTUM = 0.9
MIN_STEPS = 500  # small sets: at least this many steps, whatever the epochs
EVAL_CHUNK = 4096  # samples per evaluation matmul


@dataclass(frozen=True)
class Head:
    """One point of the grid and what it reached."""

    lr: float
    weight_decay: float
    held_out_acc1: float = float("nan")
    val_acc1: float = float("nan")
    val_acc5: float = float("nan")


def held_out_split(num_samples: int, seed: int, fraction: float = HELD_OUT) -> Tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) indices: a seeded ``fraction`` of ``range(num_samples)``, at least one
    sample, held out; both sorted."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))  # (N,)
    held = max(1, round(fraction * num_samples))
    return order[held:].sort().values, order[:held].sort().values


def standardize(reference: torch.Tensor, *features: torch.Tensor) -> List[torch.Tensor]:
    """Every tensor of ``features`` less ``reference``'s per-dimension mean, over its std."""
    mean, std = reference.mean(dim=0), reference.std(dim=0).clamp_min(1e-6)  # (D,) each
    return [(x - mean) / std for x in features]


def head_logits(features: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """Every head's logits, (B, D) x (D, H, C) -> (B, H, C), as one matmul over all the heads."""
    width, num_heads, num_classes = weights.shape
    return (features @ weights.reshape(width, num_heads * num_classes)).view(-1, num_heads, num_classes) + biases


@torch.no_grad()
def train_heads(
    features: torch.Tensor, labels: torch.Tensor, *, num_classes: int, lrs: torch.Tensor, weight_decays: torch.Tensor,
    steps: int, batch_size: int, seed: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``len(lrs)`` linear heads on ``(N, D)`` features, trained together: SGD with momentum, a
    half-cosine from each head's lr to 0 over ``steps`` batches, L2 decay of the weights (not the
    biases). Returns their weights (D, H, C) and biases (H, C). Each head's loss is its own mean
    cross-entropy, whose gradient with respect to the logits is (softmax - one-hot) / B, so the
    heads never interact and no autograd graph is needed."""
    device, num_heads = features.device, len(lrs)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    weights = (torch.randn(features.shape[1], num_heads, num_classes, generator=generator) * 0.01).to(device)
    biases = torch.zeros(num_heads, num_classes, device=device)
    velocity_w, velocity_b = torch.zeros_like(weights), torch.zeros_like(biases)
    lrs, weight_decays = lrs.to(device), weight_decays.to(device)
    batch_size = min(batch_size, len(features))
    order = torch.empty(0, dtype=torch.long)
    for step in range(steps):
        if len(order) < batch_size:  # a new pass over the data, in a new order
            order = torch.randperm(len(features), generator=generator)
        batch, order = order[:batch_size].to(device), order[batch_size:]
        x = features[batch]  # (B, D)
        grad_logits = head_logits(x, weights, biases).softmax(dim=-1)  # (B, H, C)
        grad_logits[torch.arange(len(batch), device=device), :, labels[batch]] -= 1.0
        grad_logits /= len(batch)
        grad_w = (x.T @ grad_logits.flatten(1)).view_as(weights) + weight_decays[:, None] * weights  # (D, H, C)
        velocity_w.mul_(MOMENTUM).add_(grad_w)
        velocity_b.mul_(MOMENTUM).add_(grad_logits.sum(dim=0))
        scale = 0.5 * (1.0 + math.cos(math.pi * step / steps))
        weights -= (lrs * scale)[:, None] * velocity_w
        biases -= (lrs * scale)[:, None] * velocity_b
    return weights, biases


@torch.no_grad()
def top_k_accuracy(weights: torch.Tensor, biases: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                   k: int) -> torch.Tensor:
    """Each head's top-k accuracy (%) on ``features``: (H,)."""
    correct = torch.zeros(weights.shape[1], device=features.device)
    for start in range(0, len(features), EVAL_CHUNK):
        chunk = slice(start, start + EVAL_CHUNK)
        logits = head_logits(features[chunk], weights, biases)  # (B, H, C)
        top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # (B, H, k)
        correct += (top == labels[chunk][:, None, None]).any(dim=-1).sum(dim=0)
    return 100.0 * correct / len(features)


def default_steps(num_samples: int, batch_size: int, epochs: float) -> int:
    """``epochs`` passes over ``num_samples`` features at ``batch_size``, and at least ``MIN_STEPS``."""
    return max(MIN_STEPS, math.ceil(epochs * num_samples / batch_size))


def sweep(
    train: Tuple[torch.Tensor, torch.Tensor], val: Tuple[torch.Tensor, torch.Tensor], *, num_classes: int,
    lrs: Sequence[float] = LEARNING_RATES, weight_decays: Sequence[float] = WEIGHT_DECAYS, epochs: float = 10,
    batch_size: int = 1024, seed: int = 0,
) -> Tuple[Head, List[Head]]:
    """Train the grid ``lrs`` x ``weight_decays`` on the training features less a held-out tenth,
    and return the head best on that tenth (ties: the first in the grid) and every head's figures.
    A collective on several processes: each rank trains the heads ``rank::world_size``."""
    (train_x, train_y), (val_x, val_y) = train, val
    fit_index, held_index = held_out_split(len(train_x), seed)
    fit_x, held_x, val_x = standardize(train_x[fit_index], train_x[fit_index], train_x[held_index], val_x)
    fit_y, held_y = train_y[fit_index], train_y[held_index]
    grid = [(lr, decay) for lr in lrs for decay in weight_decays]
    mine = list(range(get_rank(), len(grid), get_world_size()))
    heads, error = {}, None
    try:  # each rank's own heads; an error in them is every rank's, before the gathering below
        if mine:
            weights, biases = train_heads(
                fit_x, fit_y, num_classes=num_classes, lrs=torch.tensor([grid[i][0] for i in mine]),
                weight_decays=torch.tensor([grid[i][1] for i in mine]), seed=seed, batch_size=batch_size,
                steps=default_steps(len(fit_x), min(batch_size, len(fit_x)), epochs),
            )
            held = top_k_accuracy(weights, biases, held_x, held_y, 1).tolist()
            val1 = top_k_accuracy(weights, biases, val_x, val_y, 1).tolist()
            val5 = top_k_accuracy(weights, biases, val_x, val_y, 5).tolist()
            heads = {i: Head(*grid[i], held[n], val1[n], val5[n]) for n, i in enumerate(mine)}
    except Exception as raised:  # noqa: BLE001 - every rank must hear of it, whatever it is
        error = raised
    raise_on_all_ranks(error)
    for part in all_gather_objects(heads):
        heads.update(part)
    every = [heads[i] for i in range(len(grid))]
    chosen = max(every, key=lambda head: head.held_out_acc1)  # the first of equals: max keeps the first
    return chosen, every
