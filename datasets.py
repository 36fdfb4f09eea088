"""Which samples a command line means, and how they reach the training step: the pretraining and
classification datasets (image folders, tar shards, CIFAR, the synthetic set), per-sample seeding,
the rank-sharded sampler that can resume part-way through an epoch, and the training loader.

Reading files is ``image_data.files``, shards ``image_data.shards``, the order of an epoch
``image_data.epoch_order``, the transforms ``augmentation``, the synthetic images ``synthetic``,
and the device decoder ``device_decoder``.
"""
import functools
import os
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import CIFAR10, CIFAR100

from image_data.augmentation import RGB, Crops, build_pil_pretraining_transform, build_tensor_pretraining_transform
from image_data.device_decoder import RandomCropBox, read_encoded
from image_data.epoch_order import EpochOrder, EpochSampler, PermutationOrder, ShardWindowOrder
from image_data.files import (
    DEFAULT_MAX_IMAGE_PIXELS,
    NoReadableImageError,
    ReadErrors,
    SkipUnreadable,
    build_image_folder,
    class_folders,
    count_skipped_all_ranks,
    decode_rgb,
    labelled_folder,
    load_image,
    reset_skipped,
    wrapped,
)
from image_data.geometry import to_grid
from image_data.idx import SPLIT_FILES, IdxImages, idx_path, read_idx, read_split
from image_data.remote_loading import RemoteLoading, remote_loading
from image_data.shard_cache import CacheSettings
from image_data.shard_names import is_shard_spec
from image_data.shards import ShardCatalog, ShardImages, catalog_shards
from image_data.synthetic import SYNTHETIC_NUM_CLASSES, synthetic_split
from training.preemption import worker_init_fn
from training.settings import Settings
from utils import UsageError, seed_everything

IDX_SETS = ("FashionMNIST",)  # a folder of MNIST-style IDX files (image_data.idx)
DATA_SETS = ("image_folder", "synthetic", *IDX_SETS)
DECODERS = ("pil", "tensor", "device")
CLASSIFICATION_SETS = ("IMNET", "image_folder", "CIFAR10", "CIFAR100", "synthetic", *IDX_SETS)
CIFAR_FOLDERS = {"CIFAR10": "cifar-10-batches-py", "CIFAR100": "cifar-100-python"}
CIFAR_CLASSES = {"CIFAR10": 10, "CIFAR100": 100}


# ----------------------------------------------------------------------------- datasets


def first_samples(dataset: Dataset, num_samples: Optional[int]) -> Dataset:
    """Only the first ``num_samples`` samples (all of them when None or larger)."""
    if num_samples is not None and num_samples < len(dataset):
        return Subset(dataset, range(num_samples))
    return dataset


def file_loader(in_chans: int, max_pixels: int) -> Callable[[object], object]:
    """``load_image`` for ``in_chans`` channels, skipping images over ``max_pixels`` pixels."""
    return functools.partial(load_image, in_chans=in_chans, max_pixels=max_pixels)


def pretraining_reader(
    decoder: str, crops: Crops, *, in_chans: int, max_pixels: int
) -> Tuple[Callable, Callable[[str], object]]:
    """``(transform, file loader)`` of a pretraining ``decoder``: "pil" decodes with PIL (or reads
    ``.npy`` arrays) and crops PIL images, or tensors for channel counts other than RGB; "tensor"
    decodes RGB files with ``decode_rgb`` and crops uint8 tensors, about twice PIL's images/s
    (benchmarks/RESULTS.md); "device" reads the file's bytes and draws the crop box, which
    ``image_data.device_decoder.crop_on_device`` applies on the training device. Each loader skips images over
    ``max_pixels`` pixels."""
    if decoder in ("tensor", "device") and in_chans != RGB:
        raise ValueError(f"decoder {decoder!r} decodes RGB files; with in_chans {in_chans} use decoder 'pil' "
                         "(the default)")
    if decoder == "tensor":
        return build_tensor_pretraining_transform(crops), functools.partial(decode_rgb, max_pixels=max_pixels)
    if decoder == "device":
        return RandomCropBox(crops), functools.partial(read_encoded, max_pixels=max_pixels)
    if decoder == "pil":
        return build_pil_pretraining_transform(crops, in_chans), file_loader(in_chans, max_pixels)
    raise ValueError(f"unknown decoder {decoder!r}; choose from {', '.join(DECODERS)}")


def require_data_path(data_set: str, data_path: Optional[str]) -> None:
    """Every data set but the synthetic one reads files from ``--data_path``."""
    if data_set != "synthetic" and not data_path:
        raise ValueError(f"--data_set {data_set} needs --data_path; omit both for the synthetic dataset")


def require_eval_data_path(data_set: str, eval_data_path: Optional[str]) -> None:
    """``--data_set image_folder`` evaluates on a path of its own."""
    if data_set == "image_folder" and not eval_data_path:
        raise ValueError("--data_set image_folder trains on --data_path and evaluates on --eval_data_path, which is "
                         "missing; for a folder that holds train/ and val/, use --data_set IMNET")


def check_rgb(data_set: str, in_chans: int) -> None:
    """The synthetic set and CIFAR are RGB."""
    if in_chans != RGB:
        raise ValueError(f"{data_set} images are RGB; with in_chans {in_chans} give an image folder")


def build_pretraining_dataset(
    data_set: str,
    data_path: Optional[str],
    crops: Crops,
    *,
    num_samples: Optional[int] = None,
    decoder: str = "pil",
    in_chans: int = RGB,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    index_dir: Optional[str] = None,
    cache: Optional[CacheSettings] = None,
) -> Dataset:
    """``(image, label)`` samples, augmented (3, H, W) uint8 images; ``num_samples`` keeps only
    the first N; the labels go unused. ``data_path`` is a folder or tar shards
    (``image_data.shards``), whose indexes go under ``index_dir`` where their folder is read-only, and
    which are read through ``cache`` in object storage.

    Images stay uint8 until ``image_data.augmentation.normalize_on_device``; the synthetic set is its training
    split, the images finetuning also trains on, and is drawn, so it has no files to decode.
    """
    transform, loader = pretraining_reader(decoder, crops, in_chans=in_chans, max_pixels=max_pixels)
    if decoder != "pil" and data_set in ("synthetic", *IDX_SETS):
        raise ValueError(f"decoder {decoder!r} decodes image files and the {data_set} dataset has none: "
                         "use decoder 'pil' (the default) or an image folder")
    if data_set == "synthetic":
        check_rgb(data_set, in_chans)
        dataset: Dataset = synthetic_split("train", max(to_grid(crops.size)), num_samples, transform)
    elif data_set == "image_folder":
        require_data_path(data_set, data_path)
        if is_shard_spec(data_path):
            return shard_images(catalog_shards(data_path, index_dir, cache), transform, loader, num_samples)
        dataset = build_image_folder(data_path, transform, loader)
    elif data_set in IDX_SETS:
        require_data_path(data_set, data_path)
        dataset = IdxImages(*read_split(data_path, "train"), transform, in_chans)
    else:
        raise ValueError(f"unknown data_set {data_set!r}; choose from {', '.join(DATA_SETS)}")
    return first_samples(dataset, num_samples)


def shard_images(catalog: ShardCatalog, transform: Callable, loader: Callable,
                 num_samples: Optional[int]) -> SkipUnreadable:
    """The samples of the catalogued tar shards, unreadable ones skipped."""
    return SkipUnreadable(ShardImages(catalog, transform, ReadErrors(loader), num_samples))


def check_readable(dataset: Dataset) -> None:
    """Read the first sample (``SkipUnreadable`` moves on to the next readable file), so a dataset
    none of whose files can be read is one usage error before anything is written. The RNGs are
    left as they were, and the warnings for the files skipped on the way come when training
    meets them."""
    if len(dataset) == 0:
        return
    with seeded_rngs((0,)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dataset[0]
        except NoReadableImageError as error:
            raise UsageError(str(error)) from error


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
    *,
    data_path: Optional[str],
    transform: Callable,
    image_size: int,
    eval_data_path: Optional[str] = None,
    num_samples: Optional[int] = None,
    in_chans: int = RGB,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    index_dir: Optional[str] = None,
    cache: Optional[CacheSettings] = None,
) -> Tuple[Dataset, int]:
    """The train or evaluation split of a labelled dataset and its number of classes (for tar
    shards, the largest label + 1).

    IMNET reads ``data_path/train`` and ``data_path/val``; image_folder reads ``data_path`` for
    training and ``eval_data_path`` for evaluation, each a folder of class folders or labelled tar
    shards; CIFAR reads torchvision's files in data_path. The synthetic set draws its images
    ``image_size`` pixels a side.
    """
    if data_set == "synthetic":
        check_rgb(data_set, in_chans)
        dataset = synthetic_split("train" if is_train else "val", image_size, num_samples, transform)
        return dataset, SYNTHETIC_NUM_CLASSES
    require_data_path(data_set, data_path)
    if data_set in IDX_SETS:
        dataset = IdxImages(*read_split(data_path, "train" if is_train else "val"), transform, in_chans)
        return first_samples(dataset, num_samples), len(dataset.classes)
    if data_set in CIFAR_FOLDERS:
        check_rgb(data_set, in_chans)
        dataset = cifar(data_set, data_path, is_train, transform)
        return first_samples(dataset, num_samples), len(dataset.classes)
    if data_set not in ("IMNET", "image_folder"):
        raise ValueError(f"unknown data_set {data_set!r}; choose from {', '.join(CLASSIFICATION_SETS)}")
    root = classification_root(data_set, is_train, data_path, eval_data_path)
    if is_shard_spec(root):
        catalog = catalog_shards(root, index_dir, cache)
        return shard_images(catalog, transform, file_loader(in_chans, max_pixels), num_samples), catalog.num_classes(root)
    folder = labelled_folder(root, transform, file_loader(in_chans, max_pixels))
    return first_samples(SkipUnreadable(folder), num_samples), len(folder.classes)


def classification_root(data_set: str, is_train: bool, data_path: str, eval_data_path: Optional[str]) -> str:
    """The folder (or shards) of a split: IMNET's ``train/``/``val/``, or image_folder's two paths."""
    if data_set == "IMNET":
        if is_shard_spec(data_path):
            raise ValueError("--data_set IMNET reads the folders train/ and val/ of --data_path; for tar shards "
                             "give --data_set image_folder --data_path TRAIN_SHARDS --eval_data_path VAL_SHARDS")
        return os.path.join(data_path, "train" if is_train else "val")
    if not is_train:
        require_eval_data_path(data_set, eval_data_path)
    return data_path if is_train else eval_data_path


def count_classes(data_set: str, is_train: bool, *, data_path: Optional[str], eval_data_path: Optional[str],
                  index_dir: Optional[str] = None, cache: Optional[CacheSettings] = None) -> int:
    """A labelled split's number of classes from its class folders alone, without listing its
    images (for tar shards, the largest label + 1, from their indexes); the same errors as
    ``build_classification_dataset`` for a missing folder or a bad shard."""
    if data_set == "synthetic":
        return SYNTHETIC_NUM_CLASSES
    if data_set in CIFAR_FOLDERS:
        return CIFAR_CLASSES[data_set]
    if data_set not in CLASSIFICATION_SETS:
        raise ValueError(f"unknown data_set {data_set!r}; choose from {', '.join(CLASSIFICATION_SETS)}")
    require_data_path(data_set, data_path)
    if data_set in IDX_SETS:  # the labels' file alone; the images' are checked when the split is built
        labels = read_idx(idx_path(data_path, SPLIT_FILES["train" if is_train else "val"][1]), dims=1)
        return int(labels.max()) + 1 if len(labels) else 0
    root = classification_root(data_set, is_train, data_path, eval_data_path)
    if is_shard_spec(root):
        return catalog_shards(root, index_dir, cache).num_classes(root)
    return len(class_folders(root))


# ----------------------------------------------------------------------------- seeding and sampling


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


def epoch_order(dataset: Dataset, seed: int, shuffle_window: int) -> EpochOrder:
    """Windows of ``shuffle_window`` shards for tar shards, ``torch.randperm`` for the rest."""
    shards = wrapped(dataset, ShardImages)
    if shards is None:
        return PermutationOrder(len(dataset), seed)
    return ShardWindowOrder(shards.shard_counts, shuffle_window, seed)


class EpochLoader(DataLoader):
    """The training loader as the loop uses it (``training.loop.EpochLoader``): an epoch starts at a
    position of its order (``EpochSampler``), and its unreadable images are counted (``SkipUnreadable``)."""

    def __init__(self, *args, remote: Optional[RemoteLoading] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.remote = remote

    def __iter__(self):  # shards in object storage: prefetched, a failed fetch stopping every rank
        if self.remote is None:
            return super().__iter__()
        return self.remote.batches(super().__iter__, epoch=self.sampler.epoch, start=self.sampler.samples_done,
                                   global_batch=self.batch_size * self.sampler.num_replicas)

    def start_epoch(self, epoch: int, samples_done: int = 0) -> None:
        """Serve ``epoch``, leaving out the ``samples_done`` positions of its global order that a
        resumed epoch has already trained on, and start counting the epoch's unreadable images."""
        self.sampler.set_epoch(epoch, samples_done)
        reset_skipped(self.dataset)

    def skipped_images(self, device: torch.device) -> int:
        """The epoch's unreadable images over all ranks (a collective)."""
        return count_skipped_all_ranks(self.dataset, device)


@dataclass(frozen=True)
class Loading(Settings):
    """What the training loader reads: the batch per process, this process's rank among how many,
    the seed and ``--shuffle_window`` of the epoch order, the workers, whether batches are pinned
    (never on the CPU), and the stop signals the workers leave to the training process."""

    batch_size: int
    seed: int
    shuffle_window: int
    world_size: int = 1
    rank: int = 0
    num_workers: int = 0
    pin_mem: bool = False
    preempt_signals: Tuple[str, ...] = ("none",)


def build_train_loader(dataset: Dataset, loading: Loading, collate_fn: Optional[Callable] = None) -> EpochLoader:
    """Shuffled, rank-sharded full batches whose samples are seeded per (seed, epoch, index), so a
    run resumed mid-epoch sees exactly the batches an uninterrupted one would have.
    ``collate_fn`` replaces the default stacking (``collate_encoded`` for the device decoder)."""
    if len(dataset) < loading.batch_size * loading.world_size:
        raise UsageError(
            f"{len(dataset)} training images are fewer than one global batch ({loading.batch_size} x "
            f"{loading.world_size} processes); lower --batch_size or add images"
        )
    seeded = SeededSamples(dataset, loading.seed)
    order = epoch_order(dataset, loading.seed, loading.shuffle_window)
    return EpochLoader(
        seeded,
        remote=remote_loading(dataset, order, loading.shuffle_window),
        batch_size=loading.batch_size,
        sampler=EpochSampler(order, loading.world_size, loading.rank),
        num_workers=loading.num_workers,
        collate_fn=collate_fn,
        pin_memory=loading.pin_mem,
        drop_last=True,
        persistent_workers=loading.num_workers > 0,
        worker_init_fn=worker_init_fn(loading.preempt_signals),
    )
