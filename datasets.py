"""Which samples a command line means, and how they reach the training step: the pretraining and
classification datasets (image folders, CIFAR, the synthetic set), per-sample seeding, the
rank-sharded sampler that can resume part-way through an epoch, and the training loader.

Reading files is ``image_files``, the transforms ``augmentation``, the synthetic images
``synthetic``, and the device decoder ``device_decoder``.
"""
import os
import random
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.datasets import CIFAR10, CIFAR100

from augmentation import build_pil_pretraining_transform, build_tensor_pretraining_transform
from device_decoder import RandomCropBox, read_encoded
from image_files import SkipUnreadable, build_image_folder, decode_rgb, labelled_folder, load_rgb
from synthetic import SYNTHETIC_NUM_CLASSES, synthetic_split
from utils import UsageError, seed_everything

DATA_SETS = ("image_folder", "synthetic")
DECODERS = ("pil", "tensor", "device")
CLASSIFICATION_SETS = ("IMNET", "image_folder", "CIFAR10", "CIFAR100", "synthetic")
CIFAR_FOLDERS = {"CIFAR10": "cifar-10-batches-py", "CIFAR100": "cifar-100-python"}


# ----------------------------------------------------------------------------- datasets


def first_samples(dataset: Dataset, num_samples: Optional[int]) -> Dataset:
    """Only the first ``num_samples`` samples (all of them when None or larger)."""
    if num_samples is not None and num_samples < len(dataset):
        return Subset(dataset, range(num_samples))
    return dataset


def pretraining_reader(decoder: str, input_size: int) -> Tuple[Callable, Callable[[str], object]]:
    """``(transform, file loader)`` of a pretraining ``decoder``: "pil" decodes with PIL and crops
    PIL images; "tensor" decodes with ``decode_rgb`` and crops uint8 tensors, about twice PIL's
    images/s (benchmarks/RESULTS.md); "device" reads the file's bytes and draws the crop box, which
    ``device_decoder.crop_on_device`` applies on the training device."""
    if decoder == "tensor":
        return build_tensor_pretraining_transform(input_size), decode_rgb
    if decoder == "device":
        return RandomCropBox(input_size), read_encoded
    if decoder == "pil":
        return build_pil_pretraining_transform(input_size), load_rgb
    raise ValueError(f"unknown decoder {decoder!r}; choose from {', '.join(DECODERS)}")


def build_pretraining_dataset(
    data_set: str,
    data_path: Optional[str],
    input_size: int,
    num_samples: Optional[int] = None,
    decoder: str = "pil",
) -> Dataset:
    """``(image, label)`` samples, augmented (3, H, W) uint8 images; ``num_samples`` keeps only
    the first N; the labels go unused.

    Images stay uint8 until ``augmentation.normalize_on_device``; the synthetic set is its training
    split, the images finetuning also trains on, and is drawn, so it has no files to decode.
    """
    transform, loader = pretraining_reader(decoder, input_size)
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


def position_loader(loader: DataLoader, epoch: int, start_step: int) -> None:
    """Point the loader's ``EpochSampler`` at ``epoch``, leaving out the batches a resumed epoch
    has already trained on."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip_first(start_step * loader.batch_size)
