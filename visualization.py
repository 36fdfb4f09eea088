"""Pictures of MAE reconstructions: original | masked input | reconstruction | pasted."""
from pathlib import Path
from typing import Sequence

import torch
from torchvision.utils import make_grid, save_image

from modeling_pretrain import PretrainVisionTransformer

PANELS = ("original", "masked input", "reconstruction", "reconstruction + visible")


def denormalize(imgs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the input normalization and clamp to displayable [0, 1]."""
    mean_t = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    return (imgs * std_t + mean_t).clamp(0.0, 1.0)


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
    rows = torch.stack(panels, dim=1).flatten(0, 1)  # (B * 4, C, H, W), row-major by image
    return make_grid(rows.cpu(), nrow=len(PANELS), padding=2, pad_value=1.0)


def save_png(grid: torch.Tensor, path: Path) -> None:
    """Write the picture through a temporary name so readers never see half a PNG."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    save_image(grid, tmp)
    tmp.replace(path)
