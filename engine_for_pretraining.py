"""One epoch of MAE pretraining."""
import argparse
from typing import Dict, Iterable, Optional

import torch

import utils


def train_one_epoch(
    model: torch.nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    epoch: int,
    args: argparse.Namespace,
    log_writer: Optional[object] = None,
) -> Dict[str, float]:
    """Train over ``loader`` once; return the epoch's averages (loss averaged over ranks)."""
    model.train()
    mae = utils.unwrap_model(model)
    steps = len(loader)
    metrics = utils.MetricLogger()
    watch = utils.NonFiniteWatch(device)
    loss_sum = torch.zeros((), device=device)
    grad_norm = torch.zeros((), device=device)
    timer = utils.Timer()
    data_start = timer.elapsed()
    optimizer.zero_grad(set_to_none=True)
    for step, (imgs, masks) in enumerate(loader):
        data_time = timer.elapsed() - data_start
        update = (step + 1) % args.accum_iter == 0
        if step % args.accum_iter == 0:
            utils.set_learning_rate(optimizer, utils.lr_at(epoch + step / steps, args))
        num_masked = int(masks[0].sum())  # read on the host, before the copy
        imgs = imgs.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        with utils.grad_sync(model, update):
            with utils.autocast(device, args.amp):
                pred = model(imgs, masks, num_masked)
                loss = mae.forward_loss(imgs, pred, masks)
            scaler.scale(loss / args.accum_iter).backward()
        if update:
            grad_norm = utils.optimizer_step(mae, optimizer, scaler, args.clip_grad)
        watch.observe(loss, step)
        loss_sum += loss.detach()
        if step % args.print_freq == 0 or step == steps - 1:
            watch.raise_if_bad(epoch, steps, args, scaler)
            utils.log_progress(metrics, loss, grad_norm, optimizer, imgs.shape[0], data_time, timer, step, steps, epoch)
            if log_writer is not None:
                global_step = epoch * steps + step
                log_writer.add_scalar("train/loss", loss.detach().item(), global_step)
                log_writer.add_scalar("train/lr", utils.max_lr(optimizer), global_step)
                log_writer.add_scalar("train/grad_norm", float(grad_norm), global_step)
        data_start = timer.elapsed()
    watch.raise_if_bad(epoch, steps, args, scaler)
    mean_loss = float(utils.all_reduce_mean(loss_sum / steps))
    return {"loss": mean_loss, "lr": utils.max_lr(optimizer), **metrics.averages()}
