"""Augmentation: what the data-loader workers do to each sample (MAE's crop and flip for
pretraining and the linear probe, timm's RandAugment pipeline for finetuning, resize and center crop
for evaluation), and what runs on whole batches on the device after the copy (normalization,
random erasing).

RGB images are PIL images in the workers and leave them as uint8; images of any other channel
count (grayscale, 16-bit, ``.npy`` arrays) are float tensors in [0, 1] from the start and are
cropped as tensors (RandAugment is for RGB images only). Every random draw in the workers comes
from RNGs seeded per (seed, epoch, sample) by ``datasets.SeededSamples``; the draws on the device
come from the RNGs the training step seeds.
"""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import ResizeKeepRatio
from torchvision import transforms
from torchvision.transforms import v2 as transforms_v2

from image_data.geometry import to_grid

PRETRAIN_CROP_SCALE = (0.2, 1.0)  # MAE pretraining crops keep at least a fifth of the image
CLASSIFY_CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's default, which MAE's finetuning and probe keep
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect ratios, for a square output
EVAL_CROP_PCT = 224 / 256  # evaluation resizes to input / 0.875, then center-crops
RGB = 3

Size = Union[int, Sequence[int]]


@dataclass(frozen=True)
class Crops:
    """The workers' random crops: the output size (an int for a square, else (H, W)), the share of
    the image a crop keeps, and the chance of a horizontal flip."""

    size: Size
    scale: Tuple[float, float] = PRETRAIN_CROP_SCALE
    hflip: float = 0.5

    @property
    def ratio(self) -> Tuple[float, float]:
        """RandomResizedCrop's aspect ratios around the output's own, so that crops are not
        stretched on average (3/4 to 4/3 for a square, as everywhere)."""
        height, width = to_grid(self.size)
        aspect = width / height
        return CROP_RATIO[0] * aspect, CROP_RATIO[1] * aspect

    @property
    def output(self) -> Size:
        """What RandomResizedCrop takes: an int for a square, so squares behave exactly as before."""
        height, width = to_grid(self.size)
        return height if height == width else (height, width)


# ----------------------------------------------------------------------------- pretraining, in the workers


def pretraining_augmentation(crops: Crops) -> List[Callable]:
    """The MAE pretraining augmentation on PIL images: crop and flip only, since masking is the
    main regulariser."""
    return [
        transforms.RandomResizedCrop(crops.output, scale=crops.scale, ratio=crops.ratio,
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(crops.hflip),
    ]


def build_pil_pretraining_transform(crops: Crops, in_chans: int = RGB) -> Callable:
    """``pretraining_augmentation`` to a (3, H, W) uint8 tensor; ``normalize_on_device`` does the
    rest. The linear probe trains on it too, with its wider ``crop_scale``. Other channel counts
    take the same crop and flip on float tensors."""
    if in_chans != RGB:
        return tensor_crops(crops)
    return transforms.Compose([*pretraining_augmentation(crops), transforms.PILToTensor()])


def tensor_crops(crops: Crops) -> transforms_v2.Compose:
    """``pretraining_augmentation``'s crop and flip on (C, H, W) tensors, keeping their dtype."""
    return transforms_v2.Compose([
        transforms_v2.RandomResizedCrop(crops.output, scale=crops.scale, ratio=crops.ratio,
                                        interpolation=transforms_v2.InterpolationMode.BICUBIC, antialias=True),
        transforms_v2.RandomHorizontalFlip(crops.hflip),
    ])


def build_tensor_pretraining_transform(crops: Crops) -> transforms_v2.Compose:
    """``tensor_crops`` for the RGB tensors of ``decode_rgb``, giving (3, H, W) uint8: 16-bit
    files are brought to 8 bits first, as ``load_rgb`` does, and ``normalize_on_device`` scales and
    normalizes whole batches after the copy."""
    return transforms_v2.Compose([transforms_v2.ToDtype(torch.uint8, scale=True), *tensor_crops(crops).transforms])


# ----------------------------------------------------------------------------- classification, in the workers


def eval_crop_pct(input_size: int) -> float:
    """The share of the resized image the center crop keeps: 0.875 up to 224 px, all of it above,
    as the official MAE evaluates."""
    return EVAL_CROP_PCT if input_size <= 224 else 1.0


def eval_resize(input_size: int) -> int:
    """The side to resize to before the center crop: input / 0.875 up to 224 px (256 for 224)."""
    return int(input_size / eval_crop_pct(input_size))


def eval_transform(input_size: Size, in_chans: int = RGB, crop_pct: Optional[float] = None) -> Callable:
    """Resize, then center-crop ``input_size``, bicubic. A square resizes the shorter side to
    ``eval_resize``; an (H, W) output keeps the image's aspect ratio too, as the training crops do
    on average (``Crops.ratio``): the image is scaled to cover H / 0.875 x W / 0.875 (timm's
    ``ResizeKeepRatio``), then cropped. ``crop_pct`` 1 crops nothing beyond the aspect ratio (the
    pictures). RGB ends as uint8, other channel counts stay float."""
    height, width = to_grid(input_size)
    if crop_pct is None:
        crop_pct = eval_crop_pct(max(height, width))
    if height == width:
        resize = transforms.Resize(int(height / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC)
    else:
        resize = ResizeKeepRatio((math.floor(height / crop_pct), math.floor(width / crop_pct)), interpolation="bicubic")
    steps = [resize, transforms.CenterCrop((height, width))]
    return transforms.Compose(steps + [transforms.PILToTensor()] if in_chans == RGB else steps)


def build_classification_transform(
    is_train: bool,
    crops: Crops,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
    color_jitter: Optional[float] = None,
    in_chans: int = RGB,
) -> Callable:
    """The workers' part of timm's training pipeline (RandomResizedCrop, flip, RandAugment, which
    fills with ``mean``) or of the resize + center-crop evaluation pipeline, both bicubic, ending
    in a (3, H, W) uint8 tensor: ``BatchTransform`` normalizes and erases on the device. Images of
    other channel counts train on ``tensor_crops``: timm's RandAugment and color jitter are for
    RGB images."""
    if not is_train:
        return eval_transform(crops.size, in_chans)
    if in_chans != RGB:
        return tensor_crops(crops)
    return create_transform(
        crops.output, is_training=True, scale=crops.scale, ratio=crops.ratio, hflip=crops.hflip,
        color_jitter=color_jitter, auto_augment=auto_augment, interpolation="bicubic", mean=mean,
        use_prefetcher=True,
    )


# ----------------------------------------------------------------------------- whole batches, on the device


def normalize_on_device(imgs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, C, H, W) uint8 (or float in [0, 1]) batches -> normalized float32, on their own device.

    Workers hand over uint8 crops: a quarter of the bytes to collate, pin and copy, and no float
    pass in the worker (benchmarks/RESULTS.md). The arithmetic is ``ToTensor`` then ``Normalize``
    (true division by 255, then by std), so the values are the ones the workers used to make;
    255 is a tensor because CUDA divides by a Python scalar as a multiplication by its inverse.
    Float batches (channel counts other than RGB, 16-bit images) are already in [0, 1].
    """
    if not (imgs.dtype == torch.uint8 or imgs.is_floating_point()):
        raise TypeError(f"normalize_on_device expects uint8 or [0, 1] float images, got {imgs.dtype}")
    shape = (-1, 1, 1)  # per channel
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=imgs.device).view(shape)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=imgs.device).view(shape)
    if imgs.is_floating_point():
        return imgs.float().sub(mean_t).div_(std_t)
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
        normalized = normalize_on_device(imgs, self.mean, self.std)  # (B, C, H, W) float32
        if self.re_prob <= 0:
            return normalized
        erasing = RandomErasing(self.re_prob, mode=self.re_mode, max_count=self.re_count, device=imgs.device)
        return erasing(normalized)  # in place, image by image
