"""Random patch masks for MAE: which patches the encoder never sees.

The count follows the official MAE rounding: ``int(N * (1 - mask_ratio))`` patches stay
visible and the rest are masked (147 of 196 at 0.75, 177 of 196 at 0.9), so every sample in
a batch masks the same number of patches and the visible tokens stack into one tensor. Masks are
made per sample, for a whole batch at once, on the device that trains.
"""
from typing import Optional, Union

import torch


def check_mask_ratio(mask_ratio: float) -> None:
    """The encoder needs at least one visible patch, so 1.0 is refused."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}; MAE uses 0.75")


def num_masked_patches(num_patches: int, mask_ratio: float) -> int:
    """Masked patches per sample with the official rounding of the visible count."""
    check_mask_ratio(mask_ratio)
    return num_patches - int(num_patches * (1 - mask_ratio))


def random_masks(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: Union[str, torch.device] = "cpu",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A ``(B, N)`` boolean mask made directly on ``device`` (no host work per step).

    Ranks of uniform noise give a uniformly random subset per row, as in the official MAE's
    ``random_masking``; the generator must live on ``device``.
    """
    num_mask = num_masked_patches(num_patches, mask_ratio)
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)  # (B, N)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # (B, N): rank of each patch's noise
    return ranks < num_mask
