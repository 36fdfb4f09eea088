"""The built-in synthetic dataset: procedural labelled images that need no files, so every script
runs anywhere and the tests make their own images.

One shape or texture kind per class, drawn in random colours at a random position and scale with
mild noise; sample ``i`` of a split depends only on ``(split seed, i)``.
"""
from typing import Callable, List, Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

SHAPE_KINDS = ("circle", "square", "triangle", "ring", "cross", "diamond", "x_cross")
TEXTURE_KINDS = ("horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checkerboard", "dots_grid")
SYNTHETIC_CLASSES = SHAPE_KINDS + TEXTURE_KINDS
SYNTHETIC_NUM_CLASSES = 10  # the classes the train/val splits use


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

    The noise is uniform in ``[-noise, noise]`` per channel: integer draws are much cheaper than
    Gaussian ones, and the workers draw every image anew.
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
        num_classes: int = SYNTHETIC_NUM_CLASSES,
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


SYNTHETIC_SPLITS = {"train": (0, 2000), "val": (1, 500)}  # split: (seed, default size)


def synthetic_split(
    split: str, image_size: int, num_samples: Optional[int], transform: Optional[Callable]
) -> SyntheticShapes:
    """The synthetic dataset's fixed train or val split: different seeds, so no image is in both.

    ``num_samples`` sizes the training split (it is procedural, so it can grow) and truncates
    the 500-image validation split.
    """
    seed, size = SYNTHETIC_SPLITS[split]
    if num_samples is not None:
        size = num_samples if split == "train" else min(num_samples, size)
    return SyntheticShapes(size, image_size=image_size, seed=seed, transform=transform)
