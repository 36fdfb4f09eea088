"""Datasets for MAE pretraining: image folders (labelled or not), a built-in synthetic set, and
the wrapper that pairs every augmented image with a fresh random patch mask.

Masks are drawn inside the dataset, so the data-loader workers make them in parallel; they use
NumPy's global generator, which ``seed_worker`` seeds per worker and per epoch.
"""
import os
import random
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from masking_generator import RandomMaskingGenerator

DATA_SETS = ("image_folder", "synthetic")
SHAPE_KINDS = ("circle", "square", "triangle", "ring", "cross", "diamond", "x_cross")
TEXTURE_KINDS = ("horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checkerboard", "dots_grid")
SYNTHETIC_CLASSES = SHAPE_KINDS + TEXTURE_KINDS


# ----------------------------------------------------------------------------- synthetic shapes

def contrasting_colours(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Random foreground and background colours far enough apart that the shape stays visible;
    both are random so colour says nothing about the class."""
    background = rng.integers(0, 256, 3)
    foreground = rng.integers(0, 256, 3)
    while np.abs(foreground - background).sum() < 180:
        foreground = rng.integers(0, 256, 3)
    return foreground, background


def shape_mask(kind: str, rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    """A solid shape of random size at a random centre, as a boolean ``(H, W)`` map."""
    radius = size * rng.uniform(0.15, 0.4)
    cx, cy = rng.uniform(radius, size - radius, 2)  # keep the whole shape inside the image
    dx, dy = xs - cx, ys - cy  # (1, W), (H, 1): broadcast to (H, W)
    if kind == "circle":
        return dx**2 + dy**2 <= radius**2
    if kind == "ring":
        inner = radius * rng.uniform(0.45, 0.7)
        return (dx**2 + dy**2 <= radius**2) & (dx**2 + dy**2 >= inner**2)
    if kind == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius
    if kind == "triangle":  # apex up, base down; width grows with the distance from the apex
        from_apex = dy + radius  # (H, 1)
        return (from_apex >= 0) & (from_apex <= 2 * radius) & (np.abs(dx) <= from_apex * 0.577)
    half_width = radius * rng.uniform(0.18, 0.3)
    inside = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if kind == "cross":
        return inside & ((np.abs(dx) <= half_width) | (np.abs(dy) <= half_width))
    if kind == "x_cross":  # |dx - dy| / sqrt(2) is the distance to a diagonal
        return inside & ((np.abs(dx - dy) <= 1.414 * half_width) | (np.abs(dx + dy) <= 1.414 * half_width))
    raise ValueError(f"unknown shape {kind!r}")


def texture_mask(kind: str, rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    """A periodic texture with random period and phase, filling a random box of at least half
    the image side, as a boolean ``(H, W)`` map."""
    period = max(3.0, size * rng.uniform(0.08, 0.2))
    px, py = xs + rng.uniform(0, period), ys + rng.uniform(0, period)  # random phase
    if kind == "horizontal_stripes":
        pattern = (py % period) < period / 2
    elif kind == "vertical_stripes":
        pattern = (px % period) < period / 2
    elif kind == "diagonal_stripes":
        pattern = ((px + py) % period) < period / 2
    elif kind == "checkerboard":
        pattern = ((px // (period / 2) + py // (period / 2)) % 2) == 0
    elif kind == "dots_grid":
        pattern = (px % period - period / 2) ** 2 + (py % period - period / 2) ** 2 <= (0.3 * period) ** 2
    else:
        raise ValueError(f"unknown texture {kind!r}")
    box_w, box_h = size * rng.uniform(0.5, 1.0, 2)
    left, top = rng.uniform(0, size - box_w), rng.uniform(0, size - box_h)
    in_box = (xs >= left) & (xs < left + box_w) & (ys >= top) & (ys < top + box_h)
    return pattern & in_box


def draw_synthetic(kind: str, size: int, rng: np.random.Generator, noise: int = 14) -> Image.Image:
    """One ``size`` x ``size`` RGB image of ``kind``, drawn at that resolution (no resampling).

    The noise is uniform in ``[-noise, noise]`` per channel: integer draws cost a third of
    Gaussian ones, which keeps a 224-pixel image near 1.5 ms.
    """
    xs = np.arange(size, dtype=np.float32)[None, :] + 0.5  # (1, W) pixel centres
    ys = np.arange(size, dtype=np.float32)[:, None] + 0.5  # (H, 1)
    foreground, background = contrasting_colours(rng)
    draw = shape_mask if kind in SHAPE_KINDS else texture_mask
    mask = draw(kind, rng, xs, ys, size)  # (H, W) bool
    palette = np.stack([background, foreground]).astype(np.int16)  # (2, 3)
    pixels = palette[mask.view(np.uint8)]  # (H, W, 3)
    pixels += rng.integers(-noise, noise + 1, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


class SyntheticShapes(Dataset):
    """Procedural labelled images that need no files: one shape or texture kind per class, with
    random colours, position, scale and mild noise.

    Sample ``i`` depends only on ``(seed, i)``, so it is the same in every worker, epoch and run.
    Labels are ``i % num_classes``, so the classes are balanced.
    """

    def __init__(
        self,
        num_samples: int = 2000,
        image_size: int = 64,
        num_classes: int = 10,
        seed: int = 0,
        transform: Optional[Callable] = None,
    ) -> None:
        if not 2 <= num_classes <= len(SYNTHETIC_CLASSES):
            raise ValueError(f"num_classes must be in [2, {len(SYNTHETIC_CLASSES)}], got {num_classes}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {image_size}")
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self.transform = transform
        self.classes: List[str] = list(SYNTHETIC_CLASSES[:num_classes])
        self.targets: List[int] = [index % num_classes for index in range(num_samples)]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Tuple[object, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        label = self.targets[index]
        rng = np.random.default_rng((self.seed, index))  # per-sample stream, no global state
        image = draw_synthetic(self.classes[label], self.image_size, rng)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


# ----------------------------------------------------------------------------- image files

def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit ('I;16*') and 32-bit integer ('I') greyscale, read as 16-bit range, to 8-bit 'L';
    PIL's own conversion clips at 255 instead of scaling, which turns most pixels white."""
    values = np.asarray(image).astype(np.int64)  # (H, W)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), mode="L")


def load_rgb(path: str) -> Image.Image:
    """Any image file as 8-bit RGB: the one loader for every folder dataset here."""
    with Image.open(path) as image:
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # the route PIL asks for; direct P -> RGB warns
        elif image.mode == "I" or image.mode.startswith("I;16"):
            image = to_8bit(image)
        return image.convert("RGB")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def find_images(root: str) -> List[str]:
    """Image paths under ``root`` at any depth, sorted so the order is the same on every machine."""
    paths = []
    for folder, _, names in os.walk(root, followlinks=True):
        paths.extend(os.path.join(folder, name) for name in names if is_image_file(name))
    return sorted(paths)


class ImageFiles(Dataset):
    """Every image under ``root`` (flat or nested, no class folders), each labelled 0."""

    def __init__(self, root: str, transform: Optional[Callable] = None) -> None:
        self.root = str(root)
        self.transform = transform
        self.samples: List[str] = find_images(self.root)
        if not self.samples:
            raise FileNotFoundError(
                f"no images ({', '.join(IMG_EXTENSIONS)}) found under {self.root}"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[object, int]:
        image = load_rgb(self.samples[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, 0


def has_class_folders(root: str) -> bool:
    """True when some direct subfolder of ``root`` holds images: the ImageFolder layout."""
    with os.scandir(root) as entries:
        folders = [entry.path for entry in entries if entry.is_dir()]
    return any(find_images(folder) for folder in folders)


def build_image_folder(root: str, transform: Optional[Callable] = None) -> Dataset:
    """torchvision's ``ImageFolder`` for ``root/<class>/...`` layouts, ``ImageFiles`` otherwise."""
    root = str(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    if has_class_folders(root):
        # allow_empty: an empty class folder is harmless for pretraining, which ignores labels
        return ImageFolder(root, transform=transform, loader=load_rgb, allow_empty=True)
    return ImageFiles(root, transform=transform)


# ----------------------------------------------------------------------------- pretraining

def build_pretraining_transform(
    input_size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> transforms.Compose:
    """The MAE pretraining augmentation: crop and flip only, since masking is the main regulariser."""
    return transforms.Compose([
        transforms.RandomResizedCrop(
            input_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
        ),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class MaskedImages(Dataset):
    """``(image, label)`` samples as ``(image, mask)``, with a new random ``(N,)`` bool mask each
    time a sample is read (True = hidden from the encoder)."""

    def __init__(self, dataset: Dataset, mask_generator: RandomMaskingGenerator) -> None:
        self.dataset = dataset
        self.mask_generator = mask_generator

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, _ = self.dataset[index]
        return image, torch.from_numpy(self.mask_generator())  # (3, H, W), (N,)


def build_pretraining_dataset(
    data_set: str,
    data_path: Optional[str],
    input_size: int,
    patch_size: int,
    mask_ratio: float,
    num_samples: Optional[int] = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    seed: int = 0,
) -> Dataset:
    """Augmented images paired with masks; ``num_samples`` keeps only the first N samples."""
    transform = build_pretraining_transform(input_size, mean, std)
    if data_set == "synthetic":
        dataset: Dataset = SyntheticShapes(num_samples or 2000, image_size=input_size, seed=seed,
                                           transform=transform)
    elif data_set == "image_folder":
        if not data_path:
            raise ValueError("data_set 'image_folder' needs a data_path")
        dataset = build_image_folder(data_path, transform)
    else:
        raise ValueError(f"unknown data_set {data_set!r}; choose from {', '.join(DATA_SETS)}")
    if num_samples is not None and num_samples < len(dataset):
        dataset = Subset(dataset, range(num_samples))
    mask_generator = RandomMaskingGenerator(input_size // patch_size, mask_ratio)
    return MaskedImages(dataset, mask_generator)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed NumPy and ``random`` from torch's per-worker seed, which
    differs between workers and changes every epoch, so masks never repeat across either.

    torch >= 1.9 already does this in its workers; calling it ourselves keeps the guarantee
    explicit, and NumPy gets a SeedSequence-mixed state so its stream is not ``random``'s.
    """
    seed = torch.initial_seed()  # base_seed + worker_id, up to 64 bits
    random.seed(seed)
    np.random.seed(np.random.SeedSequence(seed).generate_state(4))  # (4,) uint32
