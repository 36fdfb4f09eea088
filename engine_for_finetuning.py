"""One epoch of supervised finetuning, and evaluation that counts every sample once."""
import argparse
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

import utils
from datasets import BatchTransform


def classification_loss(
    model: torch.nn.Module,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    batch_transform: BatchTransform,
    mixup_fn: Optional[Callable] = None,
) -> Callable[[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """``(uint8 images, labels)`` batch -> criterion on the logits, after ``batch_transform``
    (normalization, random erasing) and mixup/cutmix when given."""

    def loss_fn(batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        samples, targets = batch  # (B, 3, H, W) uint8, (B,)
        samples = batch_transform(samples.to(device, non_blocking=True))  # (B, 3, H, W) float
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)  # targets become (B, classes) soft labels
        return criterion(model(samples), targets)

    return loss_fn


def train_one_epoch(
    model: torch.nn.Module,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    epoch: int,
    args: argparse.Namespace,
    batch_transform: BatchTransform,
    mixup_fn: Optional[Callable] = None,
    log_writer: Optional[object] = None,
    **resume: object,
) -> Dict[str, float]:
    """Train over ``loader`` once with ``batch_transform`` on the device and mixup/cutmix when
    given; ``resume`` as in ``utils.train_epoch``. Returns the epoch's averages."""
    loss_fn = classification_loss(model, criterion, device, batch_transform, mixup_fn)
    return utils.train_epoch(model, loader, optimizer, scaler, device, epoch, args, loss_fn, log_writer, **resume)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    device: torch.device,
    amp: str,
    batch_transform: BatchTransform,
    reduce: bool = True,
) -> Dict[str, float]:
    """Top-1, top-5 and cross-entropy, summed over this rank's shard and, with ``reduce``, over
    all ranks (each holding a disjoint shard).

    Sums (not per-rank means) make the result exact however unevenly the shards split.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct@1, correct@5, count
    for samples, targets in loader:
        samples = batch_transform(samples.to(device, non_blocking=True))  # (B, 3, H, W) uint8 -> float
        targets = targets.to(device, non_blocking=True)
        with utils.autocast(device, amp):
            logits = model(samples)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hits = top5.eq(targets.unsqueeze(1))  # (B, 5)
        totals += torch.stack([
            torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double(),
            hits[:, 0].sum().double(),
            hits.any(dim=1).sum().double(),
            torch.tensor(float(targets.numel()), dtype=torch.float64, device=device),
        ])
    if reduce:
        totals = utils.all_reduce_sum(totals)
    loss, correct1, correct5, count = totals.tolist()
    return {"loss": loss / count, "acc1": 100.0 * correct1 / count, "acc5": 100.0 * correct5 / count,
            "num_samples": int(count)}
