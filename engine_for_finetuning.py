"""Supervised training of an encoder (finetuning and the linear probe): the classification loss
over the shared loop (``engine.train_epoch``), evaluation that counts every sample once, and the
epochs that train, evaluate, checkpoint and keep the best."""
import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from augmentation import BatchTransform
from checkpoint import BEST, TrainingState, epoch_start, save_epoch, save_training_state, step_saver
from datasets import position_loader
from engine import train_epoch
from image_files import skipped_images
from preemption import PreemptionWatch, preemptible
from sharding import distribute
from utils import (
    Timer,
    UsageError,
    all_reduce_sum,
    append_log,
    autocast,
    format_eta,
    is_main_process,
    training_writer,
    unwrap_model,
)

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ClassificationTask:
    """What a supervised stage trains and evaluates on, besides the ``TrainingState``."""

    criterion: Criterion
    train_loader: DataLoader
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
    all ranks (each holding a disjoint shard).

    Sums (not per-rank means) make the result exact however unevenly the shards split.
    """
    model.eval()
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
    if reduce:
        totals = all_reduce_sum(totals)
    loss, correct1, correct5, count = totals.tolist()
    return {"loss": loss / count, "acc1": 100.0 * correct1 / count, "acc5": 100.0 * correct5 / count,
            "num_samples": int(count)}


def evaluate_checkpoint(
    model: torch.nn.Module, val_loader: DataLoader, eval_batch: BatchTransform, *, device: torch.device, amp: str,
    checkpoint: Mapping[str, Any], reduce: bool,
) -> Dict[str, float]:
    """``--eval``: the accuracy of the ``--resume`` checkpoint, printed and returned."""
    if not checkpoint:
        raise UsageError("--eval needs a trained checkpoint: pass --resume PATH")
    stats = evaluate(model, val_loader, device, amp, eval_batch, reduce=reduce)
    if is_main_process():
        print(f"accuracy on {stats['num_samples']} images: top-1 {stats['acc1']:.3f}%  "
              f"top-5 {stats['acc5']:.3f}%  loss {stats['loss']:.4f}")
    return stats


def train_and_evaluate(
    state: TrainingState, task: ClassificationTask, *, device: torch.device, args: argparse.Namespace,
    checkpoint: Mapping[str, Any],
) -> Dict[str, float]:
    """``run_epochs`` on the compiled, DDP-wrapped model with TensorBoard; a non-finite loss exits 1,
    a preemption signal with 128 + its number once the step is saved."""
    state.model = distribute(state.model, device, args)
    with preemptible(args) as preemption, training_writer(args.log_dir) as log_writer:
        return run_epochs(state, task, device=device, args=args, log_writer=log_writer, checkpoint=checkpoint,
                          preemption=preemption)


def run_epochs(
    state: TrainingState, task: ClassificationTask, *, device: torch.device, args: argparse.Namespace,
    log_writer: Optional[Any], checkpoint: Mapping[str, Any], preemption: Optional[PreemptionWatch] = None,
) -> Dict[str, float]:
    """Train, evaluate and checkpoint each epoch; the best top-1 so far is kept in every checkpoint."""
    timer = Timer()
    loss_fn = classification_loss(state.model, task.criterion, device, task.train_batch, task.mixup_fn)
    model = unwrap_model(state.model)
    test_stats: Dict[str, float] = {}
    max_accuracy = checkpoint.get("max_accuracy", 0.0)
    n_parameters = sum(p.numel() for p in state.model.parameters())
    for epoch in range(args.start_epoch, args.epochs):
        start = epoch_start(checkpoint, epoch)
        position_loader(task.train_loader, epoch, start.samples_done)
        save_step = step_saver(state, epoch=epoch, args=args, max_accuracy=max_accuracy)
        train_stats = train_epoch(state, task.train_loader, loss_fn, device=device, epoch=epoch, args=args,
                                  log_writer=log_writer, start=start, save_step=save_step, preemption=preemption)
        test_stats = evaluate(model, task.val_loader, device, args.amp, task.eval_batch, reduce=task.reduce_eval)
        improved = test_stats["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        save_epoch(state, epoch=epoch, args=args, max_accuracy=max_accuracy)
        if improved and args.output_dir:
            save_training_state(state, Path(args.output_dir), [BEST], epoch=epoch, args=args,
                                max_accuracy=max_accuracy)
        record = {f"train_{key}": value for key, value in train_stats.items()}
        record.update({f"test_{key}": value for key, value in test_stats.items()})
        record.update(epoch=epoch, max_accuracy=max_accuracy, n_parameters=n_parameters,
                      skipped_images=skipped_images(task.train_loader.dataset, device))
        append_log(args.output_dir, record)
        if log_writer is not None:
            for key in ("acc1", "acc5", "loss"):
                log_writer.add_scalar(f"test/{key}", test_stats[key], epoch)
        if is_main_process():
            print(json.dumps(record), flush=True)
            print(f"top-1 {test_stats['acc1']:.2f}% on {test_stats['num_samples']} images; best {max_accuracy:.2f}%")
    if not test_stats:  # resumed a finished run: report where it ended rather than nothing
        test_stats = evaluate(model, task.val_loader, device, args.amp, task.eval_batch, reduce=task.reduce_eval)
        if is_main_process():
            print(f"nothing left to train (epoch {args.start_epoch} of {args.epochs}); the resumed model: "
                  f"top-1 {test_stats['acc1']:.2f}% on {test_stats['num_samples']} images; best {max_accuracy:.2f}%")
    if is_main_process():
        print(f"training time {format_eta(timer.elapsed())}")
    return test_stats
