"""One epoch of MAE pretraining: the reconstruction loss over the shared epoch loop."""
import argparse
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

import utils
from datasets import normalize_on_device


def reconstruction_loss(
    model: torch.nn.Module, device: torch.device, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """``(images, masks)`` batch -> MAE loss on the masked patches; uint8 images (the tensor
    decoder's) are normalized with ``mean``/``std`` after the copy to the device."""
    mae = utils.unwrap_model(model)

    def loss_fn(batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        imgs, masks = batch  # (B, 3, H, W) float or uint8, (B, N) bool
        num_masked = int(masks[0].sum())  # read on the host, before the copy: no device sync
        imgs = normalize_on_device(imgs.to(device, non_blocking=True), mean, std)  # (B, 3, H, W) float
        masks = masks.to(device, non_blocking=True)
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
    loss_fn = reconstruction_loss(model, device, args.mean, args.std)
    return utils.train_epoch(model, loader, optimizer, scaler, device, epoch, args, loss_fn, log_writer, **resume)
