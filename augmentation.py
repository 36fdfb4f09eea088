"""Augmentation: what the data-loader workers do to each sample (MAE's crop and flip for
pretraining and the linear probe, timm's RandAugment pipeline for finetuning, resize and center crop
for evaluation), all ending in uint8, and what runs on whole batches on the device after the copy
(normalization, random erasing).

Every random draw in the workers comes from RNGs seeded per (seed, epoch, sample) by
``datasets.SeededSamples``; the draws on the device come from the RNGs the training step seeds.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, create_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms
from torchvision.transforms import v2 as transforms_v2


# ----------------------------------------------------------------------------- pretraining, in the workers


PRETRAIN_CROP_SCALE = (0.2, 1.0)  # MAE pretraining crops keep at least a fifth of the image


def pretraining_augmentation(input_size: int, crop_scale: Tuple[float, float] = PRETRAIN_CROP_SCALE) -> List[Callable]:
    """The MAE pretraining augmentation on PIL images: crop and flip only, since masking is the
    main regulariser."""
    return [
        transforms.RandomResizedCrop(input_size, scale=crop_scale, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
    ]


def build_pil_pretraining_transform(
    input_size: int, crop_scale: Tuple[float, float] = PRETRAIN_CROP_SCALE
) -> transforms.Compose:
    """``pretraining_augmentation`` to a (3, H, W) uint8 tensor; ``normalize_on_device`` does the
    rest. The linear probe trains on it too, with its wider ``crop_scale``."""
    return transforms.Compose([*pretraining_augmentation(input_size, crop_scale), transforms.PILToTensor()])


def build_tensor_pretraining_transform(input_size: int) -> transforms_v2.Compose:
    """``pretraining_augmentation``'s crop and flip on tensors from ``decode_rgb``, giving
    (3, H, W) uint8: 16-bit files are brought to 8 bits first, as ``load_rgb`` does, and
    ``normalize_on_device`` scales and normalizes whole batches after the copy."""
    return transforms_v2.Compose([
        transforms_v2.ToDtype(torch.uint8, scale=True),
        transforms_v2.RandomResizedCrop(
            input_size, scale=PRETRAIN_CROP_SCALE, interpolation=transforms_v2.InterpolationMode.BICUBIC,
            antialias=True,
        ),
        transforms_v2.RandomHorizontalFlip(),
    ])


# ----------------------------------------------------------------------------- classification, in the workers


def eval_resize(input_size: int) -> int:
    """The side to resize to before the center crop: input / 0.875 up to 224 px (256 for 224),
    the full image above it, as the official MAE evaluates."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return int(input_size / crop_pct)


def build_classification_transform(
    is_train: bool,
    input_size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
    color_jitter: Optional[float] = None,
) -> Callable:
    """The workers' part of timm's training pipeline (RandomResizedCrop, flip, RandAugment, which
    fills with ``mean``) or of the resize + center-crop evaluation pipeline, both bicubic, ending
    in a (3, H, W) uint8 tensor: ``BatchTransform`` normalizes and erases on the device."""
    if is_train:
        return create_transform(
            input_size, is_training=True, color_jitter=color_jitter, auto_augment=auto_augment,
            interpolation="bicubic", mean=mean, use_prefetcher=True,
        )
    return transforms.Compose([
        transforms.Resize(eval_resize(input_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.PILToTensor(),
    ])


# ----------------------------------------------------------------------------- whole batches, on the device


def normalize_on_device(imgs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) uint8 pretraining batches -> normalized float32, on their own device.

    Workers hand over uint8 crops: a quarter of the bytes to collate, pin and copy, and no float
    pass in the worker (benchmarks/RESULTS.md). The arithmetic is ``ToTensor`` then ``Normalize``
    (true division by 255, then by std), so the values are the ones the workers used to make;
    255 is a tensor because CUDA divides by a Python scalar as a multiplication by its inverse.
    """
    if imgs.dtype != torch.uint8:
        raise TypeError(f"normalize_on_device expects uint8 images, got {imgs.dtype}; were they normalized already?")
    shape = (-1, 1, 1)  # per channel
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=imgs.device).view(shape)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=imgs.device).view(shape)
    scale = torch.tensor(255.0, device=imgs.device)
    return imgs.float().div_(scale).sub_(mean_t).div_(std_t)


@dataclass(frozen=True)
class BatchTransform:
    """What a classification transform does to whole batches once they are on the device:
    ``normalize_on_device``, then (training) timm's random erasing of each image, which fills
    with normalized noise and so has to follow the normalization, as in timm's prefetcher.

    Run inside the training step, the erasing draws from the RNGs seeded per step, so a resumed
    run erases as an uninterrupted one."""

    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_count: int = 1

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        normalized = normalize_on_device(imgs, self.mean, self.std)  # (B, 3, H, W) float32
        if self.re_prob <= 0:
            return normalized
        erasing = RandomErasing(self.re_prob, mode=self.re_mode, max_count=self.re_count, device=imgs.device)
        return erasing(normalized)  # in place, image by image
