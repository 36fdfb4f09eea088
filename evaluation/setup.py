"""What the three evaluations of an encoder share (finetuning, the linear probe, k-NN): their encoder
and data flags, the labelled datasets, the encoder with the ``--finetune`` weights, and the
evaluation loader. Each script adds only its own part, as DINOv2's ``eval/setup.py`` does."""
import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from image_data.augmentation import BatchTransform, eval_transform
from image_data.files import DEFAULT_MAX_IMAGE_PIXELS
from image_data.shard_cache import CacheSettings
from training.weight_files import read_weights
from training.cli import (
    add_loading_args,
    add_shuffle_arg,
    add_size_args,
    check_model_name,
    check_patch_grid,
    patch_size_kwargs,
)
from datasets import CLASSIFICATION_SETS, build_classification_dataset, check_readable
from image_data.geometry import to_grid
from modeling_finetune import CheckpointMismatchError, create_finetune_model, load_pretrained_encoder
from training.preemption import worker_init_fn
from training.settings import Settings
from utils import UsageError, is_main_process, raise_on_all_ranks, rank_shard

TransformFactory = Callable[[bool], Callable]  # is_train -> the workers' transform of that split
Size = Union[int, List[int]]  # --input_size as training.config settles it: a square's side, or [H, W]


@dataclass(frozen=True)
class Encoder(Settings):
    """The ViT an evaluation builds: ``--model``, its image size, channels, patch and pooling."""

    model: str
    input_size: Size
    in_chans: int
    global_pool: bool
    patch_size: Optional[int] = None


@dataclass(frozen=True)
class LabelledData(Settings):
    """The labelled data set of an evaluation as ``training.config`` settled it (its kind, paths,
    ``--nb_classes`` and whether it is tar shards), what its samples are read at, and where the
    index of a folder or shards is kept (``output_dir``)."""

    data_set: str
    nb_classes: int
    input_size: Size
    in_chans: int
    data_path: Optional[str] = None
    eval_data_path: Optional[str] = None
    shards: bool = False
    num_samples: Optional[int] = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    output_dir: Optional[str] = None
    cache: Optional[CacheSettings] = None  # shards in object storage: the local cache they are read through


@dataclass(frozen=True)
class EvalLoading(Settings):
    """The evaluation loader: batch, workers, pinning (never on the CPU), whether each rank takes
    its own share (``--dist_eval`` over several processes), and the stop signals its workers leave
    to the main process."""

    batch_size: int
    num_workers: int = 0
    pin_mem: bool = False
    split: bool = False
    preempt_signals: Tuple[str, ...] = ("none",)


def add_encoder_args(parser: argparse.ArgumentParser, *, global_pool: bool) -> argparse._ArgumentGroup:
    """The encoder flags of every evaluation; finetuning pools the patch tokens by default, the
    linear probe and k-NN take the cls token, as MAE evaluates. Returns the group."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="vit_base_patch16_224", type=str, help="a timm vit_* name")
    add_size_args(model)
    model.add_argument("--global_pool", action="store_true", default=global_pool,
                       help="average the patch tokens, then fc_norm" + (" (default, as MAE)" if global_pool else ""))
    model.add_argument("--cls_token", action="store_false", dest="global_pool",
                       help="the cls token after the final norm" + ("" if global_pool else " (default, as MAE)"))
    model.add_argument("--nb_classes", default=None, type=int, help="default: the dataset's number of classes")
    model.add_argument("--finetune", default="",
                       help="pretrained checkpoint: ours (a file or sharded folder), official MAE, timm, or a Hugging "
                            "Face ViTMAE folder")
    return model


def add_data_args(parser: argparse.ArgumentParser, *, trains: bool) -> None:
    """Which labelled dataset to read; ``trains``: the script trains on it (``--shuffle_window``)."""
    data = add_loading_args(parser)
    data.add_argument("--data_path", default=None, type=str,
                      help="IMNET: folder with train/ and val/; image_folder: the training folder or tar shards "
                           "(a.tar, a-{000..099}.tar, a folder of .tar files or a file listing them); CIFAR: its files; "
                           "FashionMNIST: the folder of its IDX files")
    data.add_argument("--eval_data_path", default=None, type=str,
                      help="image_folder: the evaluation folder or tar shards")
    data.add_argument("--data_set", default=None, choices=CLASSIFICATION_SETS,
                      help="default: IMNET with a --data_path folder, image_folder with shards, synthetic without")
    if trains:
        add_shuffle_arg(data)


def add_evaluation_args(parser: argparse.ArgumentParser) -> None:
    """``--eval`` and ``--dist_eval``, for the evaluations that train (finetuning, the probe)."""
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint")
    evaluation.add_argument("--dist_eval", action="store_true",
                            help="split evaluation over the processes (each sample counted once)")


def build_datasets(
    data: LabelledData, make_transform: TransformFactory, *, train: bool
) -> Tuple[Optional[Dataset], Dataset, int]:
    """The training set (None unless ``train``), the evaluation set and their number of classes,
    which ``training.config`` counted as ``nb_classes``; ``make_transform(is_train)`` gives each
    split's transform. A collective: data that one rank cannot read stops every rank."""
    def build(is_train: bool) -> Tuple[Dataset, int]:
        try:
            dataset, nb_classes = build_classification_dataset(
                data.data_set, is_train, data_path=data.data_path, transform=make_transform(is_train),
                image_size=max(to_grid(data.input_size)), eval_data_path=data.eval_data_path,
                num_samples=data.num_samples, in_chans=data.in_chans, max_pixels=data.max_image_pixels,
                index_dir=data.output_dir, cache=data.cache,
            )
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(str(error)) from error
        check_readable(dataset)
        if nb_classes > data.nb_classes or (nb_classes != data.nb_classes and not data.shards):
            raise UsageError(f"{'training' if is_train else 'evaluation'} data now has {nb_classes} classes, "
                             f"{data.nb_classes} when the run started")  # the folders changed since then
        return dataset, nb_classes

    built, error = None, None
    try:
        val_set, nb_classes = build(False)
        built = (build(True)[0] if train else None, val_set, nb_classes)
    except UsageError as found:
        error = found
    raise_on_all_ranks(error)
    return built


def build_encoder(encoder: Encoder, *, num_classes: int, drop_path: float = 0.0) -> torch.nn.Module:
    """timm's ViT named by ``--model`` with ``--global_pool``'s pooling; ``num_classes=0`` gives
    the pooled features instead of logits."""
    check_model_name(encoder.model, "vit_*")
    model = create_finetune_model(encoder.model, num_classes, to_grid(encoder.input_size), encoder.global_pool,
                                  drop_path, in_chans=encoder.in_chans, **patch_size_kwargs(encoder.patch_size))
    check_patch_grid(model, encoder.input_size)
    return model


def load_finetune_weights(model: torch.nn.Module, finetune: str) -> None:
    """Put the pretrained encoder of ``--finetune`` into ``model``; its head starts fresh."""
    checkpoint = read_weights(Path(finetune))
    try:
        missing = load_pretrained_encoder(model, checkpoint)
    except CheckpointMismatchError as error:
        raise UsageError(f"--finetune {finetune}: {error}") from error
    if is_main_process():
        print(f"loaded the encoder of {finetune}; new: {', '.join(missing)}")


def unaugmented(*, input_size: Size, in_chans: int) -> TransformFactory:
    """Resize and center crop for either split, so each image's feature is computed once (k-NN and
    the fast probe)."""
    return lambda is_train: eval_transform(input_size, in_chans)


def normalizing_batch_transform(*, mean: Sequence[float], std: Sequence[float]) -> BatchTransform:
    """Evaluation batches (and the linear probe's training ones) on the device: normalized only."""
    return BatchTransform(tuple(mean), tuple(std))


def build_eval_loader(dataset: Dataset, loading: EvalLoading) -> DataLoader:
    """With ``--dist_eval`` each rank takes its ``utils.rank_shard``, so the summed counts see every
    sample exactly once. Otherwise every rank evaluates everything."""
    if loading.split:
        dataset = Subset(dataset, rank_shard(len(dataset)))
    return DataLoader(
        dataset, batch_size=loading.batch_size, shuffle=False, num_workers=loading.num_workers,
        pin_memory=loading.pin_mem, drop_last=False, worker_init_fn=worker_init_fn(loading.preempt_signals),
    )
