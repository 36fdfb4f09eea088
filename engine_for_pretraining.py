"""MAE pretraining as a stage of the shared loop (``training.loop.fit``): the reconstruction loss of
a batch, and after each saved epoch the reconstruction picture."""
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from evaluation.online import OnlineEvaluation
from image_data.augmentation import normalize_on_device
from image_data.device_decoder import batch_images
from masking_generator import num_masked_patches, random_masks
from training.checkpoint import TrainingState
from training.flops import mae_train_flops
from training.loop import Stage, TrainingSettings, fit
from training.wrapping import unwrap_model
from visualization import PictureBatch, write_pictures


def reconstruction_loss(
    model: torch.nn.Module, device: torch.device, mean: Sequence[float], std: Sequence[float], mask_ratio: float
) -> Callable[[Any], torch.Tensor]:
    """Loader batch -> MAE loss on the masked patches. The uint8 images are normalized with
    ``mean``/``std`` on the device (where the device decoder also decodes and crops them,
    ``image_data.device_decoder.batch_images``), and each one's mask is drawn there, as the official MAE
    does: from the RNGs ``training.loop.train_epoch`` seeds per step, so a resumed run masks as an
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


def pretrain(state: TrainingState, loader: DataLoader, *, pictures: PictureBatch, device: torch.device,
             training: TrainingSettings, mean: Sequence[float], std: Sequence[float], mask_ratio: float,
             online: Optional[OnlineEvaluation] = None) -> None:
    """Every epoch of pretraining, on every rank: the reconstruction loss over ``fit``, and after
    each saved epoch the pictures of ``pictures`` (reconstructions and features), drawn from the
    same images every time (into the checkpoints' folder), then the ``online`` evaluation when the
    epoch is due one, whose figures join the epoch's log line."""

    def after_epoch(epoch: int, log_writer: Optional[Any]) -> Dict[str, float]:
        model = unwrap_model(state.model)
        write_pictures(model, pictures, mean=mean, std=std, output_dir=training.checkpointing.output_dir,
                       log_writer=log_writer, epoch=epoch)
        return online(model, device, epoch, log_writer) if online else {}

    loss_fn = reconstruction_loss(state.model, device, mean, std, mask_ratio)
    mae = unwrap_model(state.model)
    flops = mae_train_flops(mae, num_masked_patches(mae.patch_embed.num_patches, mask_ratio))
    fit(state, Stage(loss_fn=loss_fn, after_epoch=after_epoch, flops_per_sample=flops), loader=loader, device=device,
        settings=training)
