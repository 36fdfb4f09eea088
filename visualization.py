"""Pictures of MAE reconstructions: original | masked input | reconstruction | pasted, and the fixed
batch pretraining draws after every epoch, so that successive pictures compare. Images of more
than three channels show their first three, of one or two their first (``shown_channels``)."""
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image

from image_data.augmentation import normalize_on_device
from image_data.device_decoder import batch_images
from masking_generator import random_masks
from modeling_pretrain import PretrainVisionTransformer
from training.wrapping import is_sharded
from utils import atomic_write, is_main_process

PANELS = ("original", "masked input", "reconstruction", "reconstruction + visible")
NUM_PICTURES = 8  # rows of pretraining's reconstruction.png


def denormalize(imgs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the input normalization and clamp to displayable [0, 1]."""
    mean_t = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    return (imgs * std_t + mean_t).clamp(0.0, 1.0)


def shown_channels(imgs: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> what a picture can show: the first three channels, or the first one."""
    return imgs[:, :3] if imgs.shape[1] >= 3 else imgs[:, :1]


def channels_note(in_chans: int) -> str:
    """What a picture of ``in_chans`` channels shows, for its caption ('' for RGB)."""
    if in_chans == 3:
        return ""
    if in_chans > 3:
        return f"channels 1-3 of {in_chans} shown as RGB"
    return "grayscale" if in_chans == 1 else f"channel 1 of {in_chans} shown"


def mask_to_pixels(model: PretrainVisionTransformer, mask: torch.Tensor) -> torch.Tensor:
    """(B, N) patch mask -> (B, 1, H, W) pixel mask, 1 where the patch was hidden."""
    patch_dim = model.patch_size**2
    patches = mask.float().unsqueeze(-1).expand(-1, -1, patch_dim)  # (B, N, p*p)
    return model.unpatchify(patches)  # (B, 1, H, W)


@torch.no_grad()
def reconstruction_grid(
    model: PretrainVisionTransformer,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """One row per image with the four ``PANELS``: (3, H_grid, W_grid) in [0, 1]."""
    was_training = model.training
    model.eval()
    recon, pasted = model.reconstruct(imgs, mask)
    model.train(was_training)
    original = denormalize(imgs.float(), mean, std)
    hidden = mask_to_pixels(model, mask)  # (B, 1, H, W)
    masked_input = original * (1 - hidden) + 0.5 * hidden  # hidden patches shown grey
    panels = [original, masked_input, denormalize(recon, mean, std), denormalize(pasted, mean, std)]
    rows = torch.stack([shown_channels(panel) for panel in panels], dim=1).flatten(0, 1)  # (B * 4, 3 or 1, H, W)
    return make_grid(rows.cpu(), nrow=len(PANELS), padding=2, pad_value=1.0)


def save_png(grid: torch.Tensor, path: Path) -> None:
    """Write the picture atomically, so readers never see half a PNG."""
    with atomic_write(path) as tmp:
        save_image(grid, tmp, format="PNG")


class PictureBatch(NamedTuple):
    """The images and masks pretraining reconstructs after every epoch."""

    imgs: torch.Tensor  # (B, 3, H, W) normalized, on the training device
    masks: torch.Tensor  # (B, N) bool


def picture_batch(
    loader: DataLoader, device: torch.device, *, num_patches: int, mean: Sequence[float], std: Sequence[float],
    mask_ratio: float, seed: int,
) -> PictureBatch:
    """The loader's first images as epoch 0 crops them, normalized, with masks drawn from ``seed``."""
    samples = [loader.dataset[(i, 0)] for i in range(min(NUM_PICTURES, len(loader.dataset)))]  # (index, epoch) keys
    imgs = normalize_on_device(batch_images(loader.collate_fn(samples), device), mean, std)
    generator = torch.Generator().manual_seed(seed)
    masks = random_masks(len(samples), num_patches, mask_ratio, generator=generator)  # (B, N)
    return PictureBatch(imgs, masks.to(device))


def write_pictures(
    model: PretrainVisionTransformer, pictures: PictureBatch, *, mean: Sequence[float], std: Sequence[float],
    output_dir: Optional[str], log_writer: Optional[Any], epoch: int,
) -> None:
    """``reconstruction.png`` in output_dir (latest) and an image series in TensorBoard. Every rank
    draws a sharded model's (it gathers each block's weights from all of them); rank 0 writes."""
    if not (is_main_process() or is_sharded(model)):
        return
    grid = reconstruction_grid(model, pictures.imgs, pictures.masks, mean, std)
    if not is_main_process():
        return
    if output_dir:
        save_png(grid, Path(output_dir) / "reconstruction.png")
    if log_writer is not None:
        log_writer.add_image("reconstruction", grid, epoch)
