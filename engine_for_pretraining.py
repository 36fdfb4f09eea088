"""One epoch of MAE pretraining: the reconstruction loss over the shared epoch loop."""
import argparse
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import torch

import utils
from datasets import batch_images, normalize_on_device
from masking_generator import num_masked_patches, random_masks


def reconstruction_loss(
    model: torch.nn.Module, device: torch.device, mean: Sequence[float], std: Sequence[float], mask_ratio: float
) -> Callable[[Any], torch.Tensor]:
    """Loader batch -> MAE loss on the masked patches. The uint8 images are normalized with
    ``mean``/``std`` on the device (where the device decoder also decodes and crops them,
    ``datasets.batch_images``), and each one's mask is drawn
    there, as the official MAE does: from the RNGs ``utils.train_epoch`` seeds per step, so a
    resumed run masks as an uninterrupted one."""
    mae = utils.unwrap_model(model)
    num_patches = mae.patch_embed.num_patches
    num_masked = num_masked_patches(num_patches, mask_ratio)  # known on the host: no device sync

    def loss_fn(batch: Any) -> torch.Tensor:
        imgs = normalize_on_device(batch_images(batch, device), mean, std)  # (B, 3, H, W) float; labels unused
        masks = random_masks(imgs.shape[0], num_patches, mask_ratio, device=device)  # (B, N) bool
        pred = model(imgs, masks, num_masked)  # (B, num_masked, p*p*3)
        return mae.forward_loss(imgs, pred, masks)

    return loss_fn


def train_one_epoch(
    model: torch.nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    epoch: int,
    args: argparse.Namespace,
    log_writer: Optional[object] = None,
    **resume: object,
) -> Dict[str, float]:
    """Train over ``loader`` once; ``resume`` carries ``start_step``/``loss_sum``/``save_step``
    (see ``utils.train_epoch``). Returns the epoch's averages, the loss averaged over ranks."""
    loss_fn = reconstruction_loss(model, device, args.mean, args.std, args.mask_ratio)
    return utils.train_epoch(model, loader, optimizer, scaler, device, epoch, args, loss_fn, log_writer, **resume)
