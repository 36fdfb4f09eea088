"""Supervised training of an encoder (finetuning and the linear probe) as a stage of the shared loop
(``training.loop.fit``): the classification loss, and evaluation that counts every sample once."""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from image_data.augmentation import BatchTransform
from training.checkpoint import TrainingState
from training.flops import vit_train_flops
from training.loop import EpochLoader, Stage, TrainingSettings, fit
from training.precision import autocast
from training.resume import Resuming, resume_training_state
from training.wrapping import is_sharded, unwrap_model
from utils import UsageError, all_reduce_max, all_reduce_sum, is_main_process

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ClassificationTask:
    """What a supervised stage trains and evaluates on, besides the ``TrainingState``."""

    criterion: Criterion
    train_loader: EpochLoader
    val_loader: DataLoader
    train_batch: BatchTransform  # on the device: normalization, and random erasing for finetuning
    eval_batch: BatchTransform  # normalization only
    mixup_fn: Optional[Callable] = None  # timm's Mixup/CutMix, which makes the targets soft
    reduce_eval: bool = False  # each rank evaluated its own shard: sum the counts over ranks


def classification_loss(
    model: torch.nn.Module,
    criterion: Criterion,
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
    all ranks (each holding a disjoint shard): a collective then.

    Sums (not per-rank means) make the result exact however unevenly the shards split. A sharded
    model gathers its weights in every forward pass, so there every rank runs as many passes as
    the rank with the most batches, the missing ones on a blank batch that counts for nothing.
    """
    model.eval()
    padded = reduce and is_sharded(model)
    passes = all_reduce_max(len(loader), device) if padded else 0
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct@1, correct@5, count
    for samples, targets in loader:
        samples = batch_transform(samples.to(device, non_blocking=True))  # (B, 3, H, W) uint8 -> float
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
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
    for _ in range(passes - len(loader)):
        with autocast(device, amp):
            model(blank_batch(model, device))  # only to join the other ranks' all-gathers
    if reduce:
        totals = all_reduce_sum(totals)
    loss, correct1, correct5, count = totals.tolist()
    return {"loss": loss / count, "acc1": 100.0 * correct1 / count, "acc5": 100.0 * correct5 / count,
            "num_samples": int(count)}


def blank_batch(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """One image of zeros the size the model takes: (1, C, H, W)."""
    patch_embed = next(module.patch_embed for module in model.modules() if hasattr(module, "patch_embed"))
    return torch.zeros(1, patch_embed.proj.in_channels, *patch_embed.img_size, device=device)


def evaluate_checkpoint(
    state: TrainingState, val_loader: DataLoader, eval_batch: BatchTransform, *, device: torch.device,
    resuming: Resuming, amp: str, reduce: bool,
) -> Dict[str, float]:
    """``--eval``: the accuracy of the ``--resume`` checkpoint, printed and returned (a collective:
    every rank loads it and evaluates its share)."""
    if not resume_training_state(state, resuming).checkpoint:
        raise UsageError("--eval needs a trained checkpoint: pass --resume PATH")
    stats = evaluate(unwrap_model(state.model), val_loader, device, amp, eval_batch, reduce=reduce)
    if is_main_process():
        print(f"accuracy on {stats['num_samples']} images: top-1 {stats['acc1']:.3f}%  "
              f"top-5 {stats['acc5']:.3f}%  loss {stats['loss']:.4f}")
    return stats


class BestAccuracy:
    """The epoch's evaluation for the loop (``training.loop.Evaluation``): top-1, top-5 and loss,
    and the best top-1 so far, which every checkpoint keeps as ``max_accuracy``."""

    def __init__(self, evaluate_epoch: Callable[[], Dict[str, float]]) -> None:
        self.evaluate_epoch = evaluate_epoch
        self.max_accuracy = 0.0

    def __call__(self) -> Dict[str, float]:
        return self.evaluate_epoch()

    def start(self, resumed: Mapping[str, Any]) -> None:
        self.max_accuracy = resumed.get("max_accuracy", 0.0)

    def judge(self, stats: Mapping[str, float]) -> bool:
        best = stats["acc1"] > self.max_accuracy
        self.max_accuracy = max(self.max_accuracy, stats["acc1"])
        return best

    def kept(self) -> Dict[str, Any]:
        return {"max_accuracy": self.max_accuracy}

    def describe(self, stats: Mapping[str, float]) -> str:
        return f"top-1 {stats['acc1']:.2f}% on {stats['num_samples']} images; best {self.max_accuracy:.2f}%"


def train_and_evaluate(
    state: TrainingState, task: ClassificationTask, *, device: torch.device, training: TrainingSettings
) -> Dict[str, float]:
    """Every epoch of finetuning or the probe, on every rank: the classification loss over ``fit``,
    evaluated after each epoch, the best top-1 kept in ``checkpoint-best.pth``; returns the last
    test stats."""
    model = unwrap_model(state.model)

    def evaluate_epoch() -> Dict[str, float]:
        return evaluate(model, task.val_loader, device, training.stepping.amp, task.eval_batch,
                        reduce=task.reduce_eval)

    loss_fn = classification_loss(state.model, task.criterion, device, task.train_batch, task.mixup_fn)
    stage = Stage(loss_fn=loss_fn, evaluate=BestAccuracy(evaluate_epoch), flops_per_sample=vit_train_flops(model))
    return fit(state, stage, loader=task.train_loader, device=device, settings=training)
