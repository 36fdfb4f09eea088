"""Datasets for MAE pretraining and finetuning: image folders (labelled or not), CIFAR, a built-in
synthetic set, the pretraining and finetuning transforms, and what runs on whole batches on the
device (normalization, random erasing).

Every augmentation in the workers comes from RNGs that ``SeededSamples`` seeds per (seed, epoch,
sample); the patch masks are made on the device in the training step (``engine_for_pretraining``).
"""
import functools
import io
import multiprocessing
import os
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, create_transform
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms
from torchvision.transforms import v2 as transforms_v2
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from utils import UsageError, all_reduce_sum, seed_everything

DATA_SETS = ("image_folder", "synthetic")
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


# ----------------------------------------------------------------------------- image files

def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit ('I;16*') and 32-bit integer ('I') greyscale, read as 16-bit range, to 8-bit 'L';
    PIL's own conversion clips at 255 instead of scaling, which turns most pixels white."""
    values = np.asarray(image).astype(np.int64)  # (H, W)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), mode="L")


def load_rgb(path: Union[str, BinaryIO]) -> Image.Image:
    """Any image file (a path or an open binary file) as 8-bit RGB: the one PIL loader for every
    folder dataset here."""
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

    def __init__(self, root: str, transform: Optional[Callable] = None, loader: Callable = load_rgb) -> None:
        self.root = str(root)
        self.transform = transform
        self.loader = loader
        self.samples: List[str] = find_images(self.root)
        if not self.samples:
            raise FileNotFoundError(
                f"no images ({', '.join(IMG_EXTENSIONS)}) found under {self.root}"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[object, int]:
        image = self.loader(self.samples[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, 0


def has_class_folders(root: str) -> bool:
    """True when some direct subfolder of ``root`` holds images: the ImageFolder layout."""
    with os.scandir(root) as entries:
        folders = [entry.path for entry in entries if entry.is_dir()]
    return any(find_images(folder) for folder in folders)


def build_image_folder(root: str, transform: Optional[Callable] = None, loader: Callable = load_rgb) -> Dataset:
    """torchvision's ``ImageFolder`` for ``root/<class>/...`` layouts, ``ImageFiles`` otherwise;
    ``loader`` reads one file (PIL's ``load_rgb`` or the tensor path's ``decode_rgb``)."""
    root = str(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    if has_class_folders(root):
        # allow_empty: an empty class folder is harmless for pretraining, which ignores labels
        folder = ImageFolder(root, transform=transform, loader=loader, allow_empty=True)
        return SkipUnreadable(folder, [path for path, _ in folder.samples])
    files = ImageFiles(root, transform=transform, loader=loader)
    return SkipUnreadable(files, files.samples)


# ----------------------------------------------------------------------------- splits

SYNTHETIC_SPLITS = {"train": (0, 2000), "val": (1, 500)}  # split: (seed, default size)


def synthetic_split(split: str, image_size: int, num_samples: Optional[int], transform: Optional[Callable]) -> Dataset:
    """The synthetic dataset's fixed train or val split: different seeds, so no image is in both.

    ``num_samples`` sizes the training split (it is procedural, so it can grow) and truncates
    the 500-image validation split.
    """
    seed, size = SYNTHETIC_SPLITS[split]
    if split == "train" and num_samples is not None:
        size = num_samples
    return first_samples(SyntheticShapes(size, image_size=image_size, seed=seed, transform=transform), num_samples)


def first_samples(dataset: Dataset, num_samples: Optional[int]) -> Dataset:
    """Only the first ``num_samples`` samples (all of them when None or larger)."""
    if num_samples is not None and num_samples < len(dataset):
        return Subset(dataset, range(num_samples))
    return dataset


# ----------------------------------------------------------------------------- pretraining

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


def build_pretraining_dataset(
    data_set: str,
    data_path: Optional[str],
    input_size: int,
    num_samples: Optional[int] = None,
    decoder: str = "pil",
) -> Dataset:
    """``(image, label)`` samples, augmented (3, H, W) uint8 images; ``num_samples`` keeps only
    the first N; the labels go unused.

    Images stay uint8 until ``normalize_on_device``. The synthetic set is its training split, the
    images finetuning also trains on. ``decoder`` "tensor" reads image files with ``decode_rgb``
    and augments uint8 tensors, about twice PIL's images/s (benchmarks/RESULTS.md); "device"
    samples are ``(file bytes, crop box)`` pairs that ``crop_on_device`` decodes and crops on
    the training device, batched with ``collate_encoded``. The synthetic set is drawn, so it has
    no files.
    """
    if decoder == "tensor":
        transform, loader = build_tensor_pretraining_transform(input_size), decode_rgb
    elif decoder == "device":
        transform, loader = RandomCropBox(input_size), read_encoded
    elif decoder == "pil":
        transform, loader = build_pil_pretraining_transform(input_size), load_rgb
    else:
        raise ValueError(f"unknown decoder {decoder!r}; choose from {', '.join(DECODERS)}")
    if data_set == "synthetic":
        if decoder != "pil":
            raise ValueError(f"decoder {decoder!r} decodes image files and the synthetic dataset has none: "
                             "use decoder 'pil' (the default) or an image folder")
        dataset: Dataset = synthetic_split("train", input_size, num_samples, transform)
    elif data_set == "image_folder":
        if not data_path:
            raise ValueError("data_set 'image_folder' needs a data_path")
        dataset = build_image_folder(data_path, transform, loader)
    else:
        raise ValueError(f"unknown data_set {data_set!r}; choose from {', '.join(DATA_SETS)}")
    return first_samples(dataset, num_samples)


# ----------------------------------------------------------------------------- determinism

@contextmanager
def seeded_rngs(key: Sequence[int]) -> Iterator[None]:
    """Seed torch (CPU), NumPy and ``random`` from ``key`` and restore their states afterwards,
    so a sample drawn in the main process leaves the training RNGs as they were."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    seed_everything(*key)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


class SeededSamples(Dataset):
    """Reads ``(index, epoch)`` keys and draws each sample's crop, flip and RandAugment from
    RNGs seeded by ``(seed, epoch, index)``.

    A sample then looks the same whichever worker loads it and whether or not the run was
    interrupted, which is what makes a resumed run bitwise equal to an uninterrupted one; and it
    still changes from epoch to epoch.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        index, epoch = key
        with seeded_rngs((self.seed, epoch, index)):
            return self.dataset[index]


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` yielding ``(index, epoch)`` keys for ``SeededSamples``, able to
    start the next epoch part-way through after a mid-epoch resume."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def skip_first(self, num_samples: int) -> None:
        """Leave out this rank's first ``num_samples`` samples of the next pass only."""
        self.skip = num_samples

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        indices = list(super().__iter__())[self.skip:]
        self.skip = 0
        return iter([(index, self.epoch) for index in indices])


# ----------------------------------------------------------------------------- unreadable files

UNREADABLE = (OSError, SyntaxError, ValueError)  # what PIL raises for truncated or foreign files


class SkipUnreadable(Dataset):
    """Replaces a sample whose file cannot be decoded by the next readable one, with a warning
    naming the file, and marks the file in a byte map shared with the data-loader workers, so
    the logs can count distinct unreadable files however often they are read."""

    def __init__(self, dataset: Dataset, paths: Sequence[str]) -> None:
        self.dataset = dataset
        self.paths = paths
        self.unreadable = multiprocessing.Array("b", len(paths), lock=False)  # (N,) 0/1 flags

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        for offset in range(len(self.dataset)):
            candidate = (index + offset) % len(self.dataset)
            try:
                return self.dataset[candidate]
            except UNREADABLE as error:
                self.unreadable[candidate] = 1
                warnings.warn(f"skipping unreadable image {self.paths[candidate]}: {error}", stacklevel=2)
        raise FileNotFoundError("no image in the dataset can be read")

    def count(self) -> int:
        return int(np.frombuffer(self.unreadable, dtype=np.int8).sum())


def skipped_images(dataset: Dataset, device: torch.device) -> int:
    """Distinct unreadable files met so far, summed over ranks (a collective; ranks read disjoint
    shards each epoch, so a file is counted by every rank that met it)."""
    return int(all_reduce_sum(torch.tensor(count_skipped(dataset), device=device)))


def count_skipped(dataset: Dataset) -> int:
    """Unreadable files met so far by this rank's ``SkipUnreadable`` (anywhere in the wrapper
    chain), else 0."""
    while dataset is not None:
        if isinstance(dataset, SkipUnreadable):
            return dataset.count()
        dataset = getattr(dataset, "dataset", None)
    return 0


# ----------------------------------------------------------------------------- finetuning

CLASSIFICATION_SETS = ("IMNET", "image_folder", "CIFAR10", "CIFAR100", "synthetic")
CIFAR_FOLDERS = {"CIFAR10": "cifar-10-batches-py", "CIFAR100": "cifar-100-python"}


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


def labelled_folder(root: str, transform: Callable) -> ImageFolder:
    """An ``ImageFolder`` with one subfolder per class; a clear error for anything else."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} does not exist or is not a directory")
    if not has_class_folders(root):
        raise FileNotFoundError(f"{root} has no class subfolders with images (expected {root}/<class>/<image>)")
    return ImageFolder(root, transform=transform, loader=load_rgb)


def cifar(data_set: str, root: str, is_train: bool, transform: Callable) -> Dataset:
    """CIFAR from torchvision's files under ``root``; never downloaded."""
    cls = CIFAR10 if data_set == "CIFAR10" else CIFAR100
    try:
        return cls(root, train=is_train, transform=transform, download=False)
    except RuntimeError as error:
        raise FileNotFoundError(
            f"{data_set} files not found under {root}: put torchvision's {CIFAR_FOLDERS[data_set]}/ folder "
            "there (this code never downloads)"
        ) from error


def build_classification_dataset(
    data_set: str,
    is_train: bool,
    data_path: Optional[str],
    transform: Callable,
    input_size: int,
    eval_data_path: Optional[str] = None,
    num_samples: Optional[int] = None,
) -> Tuple[Dataset, int]:
    """The train or evaluation split of a labelled dataset and its number of classes.

    IMNET reads ``data_path/train`` and ``data_path/val``; image_folder reads ``data_path`` for
    training and ``eval_data_path`` for evaluation; CIFAR reads torchvision's files in data_path.
    """
    if data_set == "synthetic":
        dataset = synthetic_split("train" if is_train else "val", input_size, num_samples, transform)
        return dataset, SYNTHETIC_NUM_CLASSES
    if not data_path:
        raise ValueError(f"data_set {data_set!r} needs a data_path")
    if data_set in CIFAR_FOLDERS:
        dataset = cifar(data_set, data_path, is_train, transform)
        return first_samples(dataset, num_samples), len(dataset.classes)
    if data_set == "IMNET":
        root = os.path.join(data_path, "train" if is_train else "val")
    elif data_set == "image_folder":
        root = data_path if is_train else eval_data_path
        if not root:
            raise ValueError("data_set 'image_folder' needs an eval_data_path for evaluation")
    else:
        raise ValueError(f"unknown data_set {data_set!r}; choose from {', '.join(CLASSIFICATION_SETS)}")
    folder = labelled_folder(root, transform)
    dataset = SkipUnreadable(folder, [path for path, _ in folder.samples])
    return first_samples(dataset, num_samples), len(folder.classes)


# ----------------------------------------------------------------------------- loading

def build_train_loader(dataset: Dataset, args, collate_fn: Optional[Callable] = None) -> DataLoader:
    """Shuffled, rank-sharded full batches whose samples are seeded per (seed, epoch, index), so a
    run resumed mid-epoch sees exactly the batches an uninterrupted one would have.
    ``collate_fn`` replaces the default stacking (``collate_encoded`` for the device decoder)."""
    if len(dataset) < args.batch_size * args.world_size:
        raise UsageError(
            f"{len(dataset)} training images are fewer than one global batch ({args.batch_size} x "
            f"{args.world_size} processes); lower --batch_size or add images"
        )
    seeded = SeededSamples(dataset, args.seed)
    return DataLoader(
        seeded,
        batch_size=args.batch_size,
        sampler=EpochSampler(seeded, args.world_size, args.rank, args.seed),
        num_workers=args.num_workers,
        collate_fn=collate_fn,
        pin_memory=args.pin_mem and args.device != "cpu",
        drop_last=True,
        persistent_workers=args.num_workers > 0,
    )


# ----------------------------------------------------------------------------- tensor decoding


DECODERS = ("pil", "tensor", "device")


@functools.lru_cache(maxsize=None)
def file_decoder() -> Callable[[str], torch.Tensor]:
    """torchcodec's image decoder where it is installed (torchvision 0.29 deprecates its own),
    else ``torchvision.io``'s; both give (3, H, W) RGB. Chosen once per process, since a failed
    import is retried, and searched for on disk, every time it runs."""
    try:
        from torchcodec.decoders import decode_image
    except ImportError:
        from torchvision.io import ImageReadMode, read_file
        from torchvision.io import decode_image as decode_bytes

        return lambda path: decode_bytes(read_file(path), mode=ImageReadMode.RGB)
    return lambda path: decode_image(path, mode="RGB")


def decode_rgb(path: str) -> torch.Tensor:
    """Any image file as a (3, H, W) RGB tensor (uint8; uint16 for 16-bit PNGs), decoded without
    PIL. A file that cannot be decoded raises ``OSError``, as with PIL, so ``SkipUnreadable``
    skips it."""
    try:
        return file_decoder()(path)
    except (RuntimeError, ValueError) as error:
        raise OSError(f"cannot decode {path}: {error}") from error


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



# ----------------------------------------------------------------------------- decoding on the device

JPEG_END = (0xFF, 0xD9)  # the end-of-image marker that a complete JPEG file ends with


class EncodedImage(NamedTuple):
    """A file as a device-decoder worker hands it over, with its size for the crop."""

    data: torch.Tensor  # (n,) uint8 JPEG bytes, or (3, H, W) uint8 pixels where nvJPEG is no use
    height: int
    width: int


def read_encoded(path: str) -> EncodedImage:
    """The bytes and size of a complete RGB or greyscale JPEG, read from its header without
    decoding it. Other files (PNG, CMYK, 16-bit, truncated JPEGs: what nvJPEG cannot take or PIL
    must judge) are decoded here by ``load_rgb``, so an unreadable one raises in the worker and
    ``SkipUnreadable`` skips it as for the other decoders."""
    data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))  # (n,) bytes, the file read once
    try:
        with Image.open(io.BytesIO(data.numpy())) as image:
            if image.format == "JPEG" and image.mode in ("RGB", "L") and tuple(data[-2:].tolist()) == JPEG_END:
                return EncodedImage(data, image.height, image.width)
    except UNREADABLE as error:
        raise OSError(f"cannot read {path}: {error}") from error
    pixels = transforms.functional.pil_to_tensor(load_rgb(io.BytesIO(data.numpy())))  # (3, H, W) uint8
    return EncodedImage(pixels, pixels.shape[1], pixels.shape[2])


class RandomCropBox:
    """``pretraining_augmentation``'s crop and flip, drawn in the worker and applied on the device
    by ``crop_on_device``. The draws are those of ``RandomResizedCrop`` then
    ``RandomHorizontalFlip`` from torch's RNG, so a seeded sample gets the box and flip the PIL
    pipeline would give it."""

    def __init__(self, input_size: int, crop_scale: Tuple[float, float] = PRETRAIN_CROP_SCALE) -> None:
        self.input_size = input_size
        self.crop, self.flip = pretraining_augmentation(input_size, crop_scale)

    def __call__(self, image: EncodedImage) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (data, (6,) int64 box: top, left, height, width, flip, output size)."""
        size_only = torch.empty(1, 1, 1).expand(3, image.height, image.width)  # get_params reads the size alone
        top, left, height, width = self.crop.get_params(size_only, self.crop.scale, self.crop.ratio)
        flip = int(torch.rand(1) < self.flip.p)
        return image.data, torch.tensor([top, left, height, width, flip, self.input_size])


class EncodedBatch(NamedTuple):
    """A batch of ``RandomCropBox`` samples; the files differ in size, so their data stay a list."""

    data: List[torch.Tensor]  # B x ((n,) JPEG bytes or (3, h, w) pixels), uint8, on the host
    boxes: torch.Tensor  # (B, 6) int64: top, left, height, width, flip, output size
    labels: torch.Tensor  # (B,)


def collate_encoded(samples: Sequence[Tuple[Tuple[torch.Tensor, torch.Tensor], int]]) -> EncodedBatch:
    """The loader's ``collate_fn`` for the device decoder."""
    return EncodedBatch(
        [data for (data, _), _ in samples],
        torch.stack([box for (_, box), _ in samples]),  # (B, 6)
        torch.tensor([label for _, label in samples]),
    )


def decode_on_device(data: Sequence[torch.Tensor], device: torch.device) -> List[Optional[torch.Tensor]]:
    """B x (3, h, w) uint8 images on ``device``: the JPEG bytes decoded there in one call (nvJPEG
    on CUDA, libjpeg-turbo on the CPU), the pixels the workers decoded copied over; None for a
    file that no decoder can read."""
    jpegs = [index for index, item in enumerate(data) if item.dim() == 1]
    images: List[Optional[torch.Tensor]] = list(data)
    for index, image in zip(jpegs, decode_jpegs([data[index] for index in jpegs], device)):
        images[index] = image
    return [None if image is None else image.to(device, non_blocking=True) for image in images]


def decode_jpegs(encoded: List[torch.Tensor], device: torch.device) -> List[Optional[torch.Tensor]]:
    """``decode_jpeg_batch`` on a batch. It returns nothing when one file fails, so such a batch
    is decoded file by file with PIL, which judges each file as the PIL path would."""
    if not encoded:
        return []
    try:
        return decode_jpeg_batch(encoded, device)
    except RuntimeError as error:
        warnings.warn(f"decoding a batch on {device} failed ({error}); decoding its files with PIL", stacklevel=2)
    return [pil_decode(item) for item in encoded]


@functools.lru_cache(maxsize=None)
def decode_stream(device: torch.device) -> "torch.cuda.Stream":
    """A CUDA stream that only ever decodes, one per device."""
    return torch.cuda.Stream(device)


JpegBatchDecoder = Callable[[List[torch.Tensor], torch.device], List[torch.Tensor]]


@functools.lru_cache(maxsize=None)
def jpeg_batch_decoder() -> JpegBatchDecoder:
    """torchcodec's ``decode_jpeg`` where it is installed (torchvision 0.29 deprecates its own),
    else ``torchvision.io``'s: both decode a list of byte tensors to RGB, as one nvJPEG batch on
    CUDA. Chosen once per process, as ``file_decoder`` is."""
    try:
        from torchcodec.decoders import decode_jpeg
    except (ImportError, OSError, RuntimeError):  # not installed, or its libraries fail to load
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as torchvision_decode_jpeg

        return lambda encoded, device: torchvision_decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    return lambda encoded, device: decode_jpeg(encoded, mode="RGB", device=device)


def decode_jpeg_batch(encoded: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """B x (3, h, w) uint8 from ``jpeg_batch_decoder``. On CUDA torchvision's decoder allocates
    its outputs on the current stream but writes them from a stream of its own that does not
    wait for it (pytorch/vision#9606): on the training stream it could be handed memory that
    kernels of the previous step, still queued, have yet to read. So it runs with
    ``decode_stream`` current, whose memory nothing queued can still be using; the training
    stream then waits for it, and the images are marked as used there, so their memory is not
    reused too early."""
    decode = jpeg_batch_decoder()
    if device.type != "cuda":
        return decode(encoded, device)
    stream = decode_stream(device)
    with torch.cuda.stream(stream):
        images = decode(encoded, device)
    training_stream = torch.cuda.current_stream(device)
    training_stream.wait_stream(stream)
    for image in images:
        image.record_stream(training_stream)
    return images


def pil_decode(encoded: torch.Tensor) -> Optional[torch.Tensor]:
    """(n,) JPEG bytes -> (3, h, w) uint8 by PIL, or None, with a warning, for an unreadable file."""
    try:
        return transforms.functional.pil_to_tensor(load_rgb(io.BytesIO(encoded.numpy())))
    except UNREADABLE as error:
        warnings.warn(f"skipping an unreadable JPEG ({error}); another image of its batch takes its place",
                      stacklevel=2)
        return None


def pil_bicubic(crop: torch.Tensor, size: int) -> torch.Tensor:
    """(1, 3, h, w) uint8 -> (1, 3, S, S) float holding 8-bit values, as PIL's bicubic resize
    computes them: antialiased (the filter widened by the reduction), one pass across, rounded and
    clipped to 8 bits, then one pass down. Without the rounding in between, bicubic overshoot on
    sharp detail ends up to 13 levels from PIL's pixels; with it, within 1."""
    across = F.interpolate(crop.float(), size=(crop.shape[2], size), mode="bicubic", antialias=True)  # (1, 3, h, S)
    across = across.round_().clamp_(0, 255)
    return F.interpolate(across, size=(size, size), mode="bicubic", antialias=True).round_().clamp_(0, 255)


def crop_on_device(batch: EncodedBatch, device: torch.device) -> torch.Tensor:
    """(B, 3, S, S) uint8: each image decoded on ``device``, cropped to its box, resized as PIL
    resizes (``pil_bicubic``) and flipped where its box says, as the PIL pipeline does in the
    workers. An unreadable file's place goes to the batch's first readable image, with its box."""
    images = decode_on_device(batch.data, device)
    readable = [index for index, image in enumerate(images) if image is not None]
    if not readable:
        raise OSError("no image of this batch can be decoded; run with --decoder pil to skip unreadable files")
    sources = [index if images[index] is not None else readable[0] for index in range(len(images))]
    boxes = batch.boxes[sources]  # (B, 6)
    crops = [
        pil_bicubic(images[index][None, :, top:top + height, left:left + width], size)  # (1, 3, S, S)
        for index, (top, left, height, width, _, size) in zip(sources, boxes.tolist())  # on the host: no sync
    ]
    resized = torch.cat(crops).to(torch.uint8)  # (B, 3, S, S)
    flip = boxes[:, 4].to(device, non_blocking=True).bool().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return torch.where(flip, resized.flip(-1), resized)


def batch_images(batch: Union[EncodedBatch, Sequence[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """A training batch's (B, 3, H, W) uint8 images on ``device``: decoded and cropped there for
    the device decoder, copied for the others."""
    if isinstance(batch, EncodedBatch):
        return crop_on_device(batch, device)
    return batch[0].to(device, non_blocking=True)
