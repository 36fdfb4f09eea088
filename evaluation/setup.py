"""What the three evaluations of an encoder share (finetuning, the linear probe, k-NN): their encoder
and data flags, the labelled datasets, the encoder with the ``--finetune`` weights, and the
evaluation loader. Each script adds only its own part, as DINOv2's ``eval/setup.py`` does."""
import argparse
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from image_data.augmentation import BatchTransform, eval_transform
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
from utils import UsageError, is_main_process, raise_on_all_ranks, rank_shard

TransformFactory = Callable[[argparse.Namespace, bool], Callable]  # (args, is_train) -> the workers' transform


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
                           "(a.tar, a-{000..099}.tar, a folder of .tar files or a file listing them); CIFAR: its files")
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
    args: argparse.Namespace, make_transform: TransformFactory, *, train: bool
) -> Tuple[Optional[Dataset], Dataset, int]:
    """The training set (None unless ``train``), the evaluation set and their number of classes,
    which ``training.config`` counted as ``args.nb_classes``; ``make_transform(args, is_train)``
    gives each split's transform. A collective: data that one rank cannot read stops every rank."""
    def build(is_train: bool) -> Tuple[Dataset, int]:
        try:
            dataset, nb_classes = build_classification_dataset(
                args.data_set, is_train, data_path=args.data_path, transform=make_transform(args, is_train),
                image_size=max(to_grid(args.input_size)), eval_data_path=args.eval_data_path,
                num_samples=args.num_samples, in_chans=args.in_chans, max_pixels=args.max_image_pixels,
                index_dir=args.output_dir,
            )
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(str(error)) from error
        check_readable(dataset)
        if nb_classes > args.nb_classes or (nb_classes != args.nb_classes and not args.shards):
            raise UsageError(f"{'training' if is_train else 'evaluation'} data now has {nb_classes} classes, "
                             f"{args.nb_classes} when the run started")  # the folders changed since then
        return dataset, nb_classes

    built, error = None, None
    try:
        val_set, nb_classes = build(False)
        built = (build(True)[0] if train else None, val_set, nb_classes)
    except UsageError as found:
        error = found
    raise_on_all_ranks(error)
    return built


def build_encoder(args: argparse.Namespace, *, num_classes: int, drop_path: float = 0.0) -> torch.nn.Module:
    """timm's ViT named by ``--model`` with ``--global_pool``'s pooling; ``num_classes=0`` gives
    the pooled features instead of logits."""
    check_model_name(args.model, "vit_*")
    model = create_finetune_model(args.model, num_classes, to_grid(args.input_size), args.global_pool, drop_path,
                                  in_chans=args.in_chans, **patch_size_kwargs(args))
    check_patch_grid(model, args.input_size)
    return model


def load_finetune_weights(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """Put the pretrained encoder of ``--finetune`` into ``model``; its head starts fresh."""
    checkpoint = read_weights(Path(args.finetune))
    try:
        missing = load_pretrained_encoder(model, checkpoint)
    except CheckpointMismatchError as error:
        raise UsageError(f"--finetune {args.finetune}: {error}") from error
    if is_main_process():
        print(f"loaded the encoder of {args.finetune}; new: {', '.join(missing)}")


def unaugmented(args: argparse.Namespace, is_train: bool) -> Callable:
    """Resize and center crop for either split, so each image's feature is computed once (k-NN and
    the fast probe)."""
    return eval_transform(args.input_size, args.in_chans)


def normalizing_batch_transform(args: argparse.Namespace) -> BatchTransform:
    """Evaluation batches (and the linear probe's training ones) on the device: normalized only."""
    return BatchTransform(tuple(args.mean), tuple(args.std))


def build_eval_loader(dataset: Dataset, args: argparse.Namespace) -> DataLoader:
    """With ``--dist_eval`` each rank takes its ``utils.rank_shard``, so the summed counts see every
    sample exactly once. Otherwise every rank evaluates everything."""
    if args.dist_eval and args.distributed:
        dataset = Subset(dataset, rank_shard(len(dataset)))
    return DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
        pin_memory=args.pin_mem and args.device != "cpu", drop_last=False, worker_init_fn=worker_init_fn(args),
    )
