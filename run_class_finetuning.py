"""MAE finetuning: train timm's ViT on labelled images from an MAE checkpoint and report top-1.

``python run_class_finetuning.py --model vit_tiny_patch16_224 --input_size 64`` runs on the
synthetic dataset anywhere; ``torchrun --nproc_per_node 8 run_class_finetuning.py --data_path
/imagenet --finetune mae_pretrain_vit_base.pth --dist_eval`` is the ImageNet recipe.
"""
import argparse
import functools
from typing import Callable, Dict, Optional, Tuple

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import utils
from datasets import build_train_loader
from engine_for_finetuning import ClassificationTask, evaluate_checkpoint, train_and_evaluate
from evaluation.setup import (
    add_data_args,
    add_encoder_args,
    add_evaluation_args,
    build_datasets,
    build_encoder,
    build_eval_loader,
    load_finetune_weights,
    normalizing_batch_transform,
)
from image_data.augmentation import CLASSIFY_CROP_SCALE, RGB, BatchTransform, Crops, build_classification_transform
from optim_factory import add_optimizer_args, create_optimizer
from training import precision
from training.checkpoint import TrainingState
from training.cli import add_crop_args, add_memory_args, add_run_args, add_schedule_args
from training.config import (
    encoder_of,
    eval_loading_of,
    labelled_data_of,
    loading_of,
    optimizer_of,
    process_group_of,
    resolve_classification,
    resuming_of,
    training_of,
    wrapping_of,
)
from training.config_file import ConfigArgumentParser
from training.output_dir import claim_output_dir
from training.performance import use_fastest_attention
from training.wrapping import wrap_model


def get_args_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser("MAE finetuning", add_help=True)
    parser.add_argument("--batch_size", default=64, type=int, help="images per GPU per step")
    parser.add_argument("--epochs", default=50, type=int, help="length of the schedule")
    parser.add_argument("--accum_iter", default=1, type=int, help="micro-steps per optimizer step")

    model = add_encoder_args(parser, global_pool=True)
    model.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth")

    add_optimizer_args(parser, weight_decay=0.05, betas=(0.9, 0.999))
    parser.add_argument("--layer_decay", default=0.75, type=float,
                        help="lr scale decay ** (num_layers + 1 - layer_id) per block")
    add_schedule_args(parser, blr=1e-3, min_lr=1e-6, warmup_epochs=5)

    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--color_jitter", default=None, type=float, help="only used without --aa")
    aug.add_argument("--aa", default="rand-m9-mstd0.5-inc1", type=str, help="timm RandAugment policy, or 'none'")
    aug.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    aug.add_argument("--reprob", default=0.25, type=float, help="random erasing probability")
    aug.add_argument("--remode", default="pixel", type=str, help="random erasing mode")
    aug.add_argument("--recount", default=1, type=int, help="random erasing count")
    aug.add_argument("--mixup", default=0.0, type=float, help="mixup alpha (on when > 0)")
    aug.add_argument("--cutmix", default=0.0, type=float, help="cutmix alpha (on when > 0)")
    aug.add_argument("--cutmix_minmax", default=None, type=float, nargs=2, help="cutmix box ratio range")
    aug.add_argument("--mixup_prob", default=1.0, type=float, help="chance of mixing a batch")
    aug.add_argument("--mixup_switch_prob", default=0.5, type=float, help="chance of cutmix when both are on")
    aug.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"])
    add_crop_args(aug, crop_scale=CLASSIFY_CROP_SCALE)

    add_data_args(parser, trains=True)
    add_evaluation_args(parser)
    add_memory_args(parser)
    add_run_args(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Finetuning's own checks, beside ``training.config``'s."""
    if mixup_active(args) and args.batch_size % 2:
        raise utils.UsageError(f"mixup/cutmix mix pairs of images: --batch_size must be even, got {args.batch_size}")


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def finetune_transform(args: argparse.Namespace, is_train: bool) -> Callable:
    """The workers' part: RandAugment for training, resize and center crop for evaluation."""
    crops = Crops(args.input_size, tuple(args.crop_scale), args.hflip)
    return build_classification_transform(is_train, crops, args.mean, rand_augment(args), args.color_jitter,
                                          args.in_chans)


def rand_augment(args: argparse.Namespace) -> Optional[str]:
    """``--aa``'s timm policy, None for 'none'."""
    return None if args.aa.lower() == "none" else args.aa


def erasing_batch_transform(args: argparse.Namespace) -> BatchTransform:
    """Finetuning's training batches on the device: normalized, then randomly erased."""
    return BatchTransform(tuple(args.mean), tuple(args.std), args.reprob, args.remode, args.recount)


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """timm's ViT named by ``--model``, with MAE's pooling and a head for the dataset."""
    return build_encoder(encoder_of(args), num_classes=args.nb_classes, drop_path=args.drop_path)


def build_criterion(args: argparse.Namespace) -> Tuple[Optional[Mixup], Callable]:
    """timm's Mixup/CutMix with soft-target loss, else label smoothing, else cross entropy."""
    if mixup_active(args):
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.nb_classes,
        )
        return mixup_fn, SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, torch.nn.CrossEntropyLoss()


def main(args: argparse.Namespace) -> Dict[str, float]:
    """Finetune (or with ``--eval`` only evaluate) as ``args`` say; returns the last test stats."""
    args = resolve_classification(args)
    check_args(args)
    return utils.run_distributed(functools.partial(run, args), process_group_of(args))


def run(args: argparse.Namespace, device: torch.device) -> Dict[str, float]:
    utils.seed_everything(args.seed, args.rank)
    train_set, val_set, _ = build_datasets(labelled_data_of(args), functools.partial(finetune_transform, args),
                                           train=not args.eval)
    model = build_model(args)
    if args.finetune and not args.eval:
        load_finetune_weights(model, args.finetune)
    with claim_output_dir(args.output_dir, lock=not args.eval):  # once the inputs are known good; held to the end
        model.to(device)
        use_fastest_attention(model, device, args.amp)
        model.set_grad_checkpointing(args.grad_checkpointing)
        wrapped = wrap_model(model, device, wrapping_of(args))  # before the optimizer, which must see FSDP's shards
        eval_loading = eval_loading_of(args)
        val_loader = build_eval_loader(val_set, eval_loading)
        normalizing = normalizing_batch_transform(mean=args.mean, std=args.std)
        state = TrainingState(wrapped, create_optimizer(optimizer_of(args), model, device),
                              precision.make_grad_scaler(device, args.amp))
        if args.eval:
            return evaluate_checkpoint(state, val_loader, normalizing, device=device, resuming=resuming_of(args),
                                       amp=args.amp, reduce=eval_loading.split)
        mixup_fn, criterion = build_criterion(args)
        task = ClassificationTask(
            criterion=criterion, train_loader=build_train_loader(train_set, loading_of(args)), val_loader=val_loader,
            train_batch=erasing_batch_transform(args), eval_batch=normalizing, mixup_fn=mixup_fn,
            reduce_eval=eval_loading.split,
        )
        if utils.is_main_process():
            if args.in_chans != RGB and (rand_augment(args) or args.color_jitter):
                print(f"RandAugment and color jitter are for RGB images; the {args.in_chans}-channel crops are cropped "
                      "and flipped only")
            n_params = sum(p.numel() for p in model.parameters())
            print(f"model {args.model}: {n_params / 1e6:.2f}M parameters; {len(train_set)} training and "
                  f"{len(val_set)} evaluation images, {args.nb_classes} classes; effective batch "
                  f"{args.eff_batch_size}; lr {args.lr:.3e} (blr {args.blr:g}); amp {args.amp}")
        return train_and_evaluate(state, task, device=device, training=training_of(args, get_args_parser()))


if __name__ == "__main__":
    utils.exit_on_usage_error(main, get_args_parser().parse_args())
