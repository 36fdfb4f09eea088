"""MAE pretraining's epochs: the reconstruction loss over the shared loop (``engine.train_epoch``),
then after each epoch its checkpoints, the reconstruction picture and the log line."""
import argparse
import json
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from augmentation import normalize_on_device
from checkpoint import TrainingState, epoch_start, save_epoch, step_saver
from datasets import position_loader
from device_decoder import batch_images
from engine import train_epoch
from image_files import skipped_images
from masking_generator import num_masked_patches, random_masks
from preemption import PreemptionWatch
from utils import Timer, append_log, format_eta, is_main_process, unwrap_model
from visualization import PictureBatch, write_pictures


def reconstruction_loss(
    model: torch.nn.Module, device: torch.device, mean: Sequence[float], std: Sequence[float], mask_ratio: float
) -> Callable[[Any], torch.Tensor]:
    """Loader batch -> MAE loss on the masked patches. The uint8 images are normalized with
    ``mean``/``std`` on the device (where the device decoder also decodes and crops them,
    ``device_decoder.batch_images``), and each one's mask is drawn there, as the official MAE
    does: from the RNGs ``engine.train_epoch`` seeds per step, so a resumed run masks as an
    uninterrupted one."""
    mae = unwrap_model(model)
    num_patches = mae.patch_embed.num_patches
    num_masked = num_masked_patches(num_patches, mask_ratio)  # known on the host: no device sync

    def loss_fn(batch: Any) -> torch.Tensor:
        imgs = normalize_on_device(batch_images(batch, device), mean, std)  # (B, 3, H, W) float; labels unused
        masks = random_masks(imgs.shape[0], num_patches, mask_ratio, device=device)  # (B, N) bool
        pred = model(imgs, masks, num_masked)  # (B, num_masked, p*p*3)
        return mae.forward_loss(imgs, pred, masks)

    return loss_fn


def run_epochs(
    state: TrainingState,
    loader: DataLoader,
    *,
    device: torch.device,
    args: argparse.Namespace,
    log_writer: Optional[Any],
    pictures: PictureBatch,
    checkpoint: Mapping[str, Any],
    preemption: Optional[PreemptionWatch] = None,
) -> None:
    """Every epoch from ``args.start_epoch``: train (part-way in after a step checkpoint), save,
    draw ``pictures``, and append the epoch's record to ``log.txt``."""
    timer = Timer()
    loss_fn = reconstruction_loss(state.model, device, args.mean, args.std, args.mask_ratio)
    n_parameters = sum(p.numel() for p in state.model.parameters())
    for epoch in range(args.start_epoch, args.epochs):
        start = epoch_start(checkpoint, epoch)
        position_loader(loader, epoch, start.samples_done)
        stats = train_epoch(state, loader, loss_fn, device=device, epoch=epoch, args=args, log_writer=log_writer,
                            start=start, save_step=step_saver(state, epoch=epoch, args=args), preemption=preemption)
        save_epoch(state, epoch=epoch, args=args)
        write_pictures(unwrap_model(state.model), pictures, mean=args.mean, std=args.std,
                       output_dir=args.output_dir, log_writer=log_writer, epoch=epoch)
        record: Dict[str, float] = {f"train_{key}": value for key, value in stats.items()}
        record.update(epoch=epoch, n_parameters=n_parameters, skipped_images=skipped_images(loader.dataset, device))
        append_log(args.output_dir, record)
        if is_main_process():
            print(json.dumps(record), flush=True)
    if is_main_process():
        print(f"training time {format_eta(timer.elapsed())}")
