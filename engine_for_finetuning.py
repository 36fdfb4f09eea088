"""One epoch of supervised finetuning, and evaluation that counts every sample once."""
import argparse
from typing import Callable, Dict, Iterable, Optional

import torch

import utils


def train_one_epoch(
    model: torch.nn.Module,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    epoch: int,
    args: argparse.Namespace,
    mixup_fn: Optional[Callable] = None,
    log_writer: Optional[object] = None,
) -> Dict[str, float]:
    """Train over ``loader`` once with mixup/cutmix when given; return the epoch's averages."""
    model.train()
    steps = len(loader)
    metrics = utils.MetricLogger()
    watch = utils.NonFiniteWatch(device)
    loss_sum = torch.zeros((), device=device)
    grad_norm = torch.zeros((), device=device)
    timer = utils.Timer()
    data_start = timer.elapsed()
    optimizer.zero_grad(set_to_none=True)
    for step, (samples, targets) in enumerate(loader):
        data_time = timer.elapsed() - data_start
        update = (step + 1) % args.accum_iter == 0
        if step % args.accum_iter == 0:
            utils.set_learning_rate(optimizer, utils.lr_at(epoch + step / steps, args))
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with utils.grad_sync(model, update):
            with utils.autocast(device, args.amp):
                loss = criterion(model(samples), targets)
            scaler.scale(loss / args.accum_iter).backward()
        if update:
            grad_norm = utils.optimizer_step(utils.unwrap_model(model), optimizer, scaler, args.clip_grad)
        watch.observe(loss, step)
        loss_sum += loss.detach()
        if step % args.print_freq == 0 or step == steps - 1:
            watch.raise_if_bad(epoch, steps, args, scaler)
            utils.log_progress(metrics, loss, grad_norm, optimizer, samples.shape[0], data_time, timer, step, steps, epoch)
            if log_writer is not None:
                global_step = epoch * steps + step
                log_writer.add_scalar("train/loss", loss.detach().item(), global_step)
                log_writer.add_scalar("train/lr", utils.max_lr(optimizer), global_step)
        data_start = timer.elapsed()
    watch.raise_if_bad(epoch, steps, args, scaler)
    mean_loss = float(utils.all_reduce_mean(loss_sum / steps))
    return {"loss": mean_loss, "lr": utils.max_lr(optimizer), **metrics.averages()}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader: Iterable, device: torch.device, amp: str, reduce: bool = True
) -> Dict[str, float]:
    """Top-1, top-5 and cross-entropy, summed over this rank's shard and, with ``reduce``, over
    all ranks (each holding a disjoint shard).

    Sums (not per-rank means) make the result exact however unevenly the shards split.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct@1, correct@5, count
    for samples, targets in loader:
        samples = samples.to(device, non_blocking=True)
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
