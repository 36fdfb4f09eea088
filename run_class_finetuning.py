"""MAE finetuning: train timm's ViT on labelled images from an MAE checkpoint and report top-1.

``python run_class_finetuning.py --model vit_tiny_patch16_224 --input_size 64`` runs on the
synthetic dataset anywhere; ``torchrun --nproc_per_node 8 run_class_finetuning.py --data_path
/imagenet --finetune mae_pretrain_vit_base.pth --dist_eval`` is the ImageNet recipe.
"""
import argparse
import json
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader, Dataset, Subset

import utils
from datasets import (
    CLASSIFICATION_SETS,
    BatchTransform,
    build_classification_dataset,
    build_classification_transform,
    build_train_loader,
    skipped_images,
)
from engine_for_finetuning import evaluate, train_one_epoch
from modeling_finetune import CheckpointMismatchError, create_finetune_model, load_pretrained_encoder
from optim_factory import add_optimizer_args, create_optimizer


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE finetuning", add_help=True)
    parser.add_argument("--batch_size", default=64, type=int, help="images per GPU per step")
    parser.add_argument("--epochs", default=50, type=int, help="length of the schedule")
    parser.add_argument("--accum_iter", default=1, type=int, help="micro-steps per optimizer step")

    model = add_encoder_args(parser, global_pool=True)
    model.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth")

    add_optimizer_args(parser, weight_decay=0.05, betas=(0.9, 0.999))
    parser.add_argument("--layer_decay", default=0.75, type=float,
                        help="lr scale decay ** (num_layers + 1 - layer_id) per block")
    utils.add_schedule_args(parser, blr=1e-3, min_lr=1e-6, warmup_epochs=5)

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

    add_data_args(parser)
    add_evaluation_args(parser)
    utils.add_run_args(parser)
    return parser


def add_encoder_args(parser: argparse.ArgumentParser, global_pool: bool) -> argparse._ArgumentGroup:
    """The encoder flags of every evaluation; finetuning pools the patch tokens by default, the
    linear probe and k-NN take the cls token, as MAE evaluates. Returns the group."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="vit_base_patch16_224", type=str, help="a timm vit_* name")
    model.add_argument("--input_size", default=224, type=int, help="image side in pixels")
    model.add_argument("--patch_size", default=None, type=int,
                       help="patch side in pixels, instead of the model's; must match the pretraining's")
    model.add_argument("--global_pool", action="store_true", default=global_pool,
                       help="average the patch tokens, then fc_norm" + (" (default, as MAE)" if global_pool else ""))
    model.add_argument("--cls_token", action="store_false", dest="global_pool",
                       help="the cls token after the final norm" + ("" if global_pool else " (default, as MAE)"))
    model.add_argument("--nb_classes", default=None, type=int, help="default: the dataset's number of classes")
    model.add_argument("--finetune", default="", help="pretrained checkpoint: ours, official MAE or timm")
    return model


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Which labelled dataset to read, shared by finetuning, linear probing and k-NN."""
    data = utils.add_loading_args(parser)
    data.add_argument("--data_path", default=None, type=str,
                      help="IMNET: folder with train/ and val/; image_folder: the training folder; CIFAR: its files")
    data.add_argument("--eval_data_path", default=None, type=str, help="image_folder: the evaluation folder")
    data.add_argument("--data_set", default=None, choices=CLASSIFICATION_SETS,
                      help="default: IMNET with --data_path, synthetic without")


def add_evaluation_args(parser: argparse.ArgumentParser) -> None:
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint")
    evaluation.add_argument("--dist_eval", action="store_true",
                            help="split evaluation over the processes (each sample counted once)")


def validate_args(args: argparse.Namespace) -> None:
    """Refuse bad command lines before anything is built or written."""
    utils.validate_common_args(args)
    validate_data_args(args)
    if args.aa.lower() == "none":
        args.aa = None
    if mixup_active(args) and args.batch_size % 2:
        raise utils.UsageError(f"mixup/cutmix mix pairs of images: --batch_size must be even, got {args.batch_size}")


def validate_data_args(args: argparse.Namespace) -> None:
    """The dataset and ``--finetune`` checks every evaluation shares."""
    if args.data_set is None:
        args.data_set = "IMNET" if args.data_path else "synthetic"
    if args.data_set != "synthetic" and not args.data_path:
        raise utils.UsageError(f"--data_set {args.data_set} needs --data_path; omit both for the synthetic dataset")
    if args.data_path and not Path(args.data_path).is_dir():
        raise utils.UsageError(f"--data_path {args.data_path} is not a directory")
    if args.finetune and not Path(args.finetune).is_file():
        raise utils.UsageError(f"--finetune {args.finetune} does not exist; check the path")


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def finetune_transform(args: argparse.Namespace, is_train: bool) -> Callable:
    """The workers' part: RandAugment for training, resize and center crop for evaluation."""
    return build_classification_transform(is_train, args.input_size, args.mean, args.aa, args.color_jitter)


def erasing_batch_transform(args: argparse.Namespace) -> BatchTransform:
    """Finetuning's training batches on the device: normalized, then randomly erased."""
    return BatchTransform(tuple(args.mean), tuple(args.std), args.reprob, args.remode, args.recount)


def normalizing_batch_transform(args: argparse.Namespace) -> BatchTransform:
    """Evaluation batches (and the linear probe's training ones) on the device: normalized only."""
    return BatchTransform(tuple(args.mean), tuple(args.std))


def build_datasets(
    args: argparse.Namespace, make_transform: Callable[[argparse.Namespace, bool], Callable] = finetune_transform
) -> Tuple[Optional[Dataset], Dataset, int]:
    """The training set (None with --eval), the evaluation set and the number of classes;
    ``make_transform(args, is_train)`` gives each split's transform."""
    def build(is_train: bool) -> Tuple[Dataset, int]:
        transform = make_transform(args, is_train)
        try:
            return build_classification_dataset(
                args.data_set, is_train, args.data_path, transform, args.input_size,
                args.eval_data_path, args.num_samples,
            )
        except (FileNotFoundError, ValueError) as error:
            raise utils.UsageError(str(error)) from error

    val_set, nb_classes = build(False)
    train_set = None
    if not args.eval:
        train_set, train_classes = build(True)
        if train_classes != nb_classes:
            raise utils.UsageError(
                f"the training data has {train_classes} classes but the evaluation data {nb_classes}; "
                "both need the same class folders"
            )
    check_nb_classes(args, nb_classes)
    return train_set, val_set, nb_classes


def check_nb_classes(args: argparse.Namespace, nb_classes: int) -> None:
    """``--nb_classes`` defaults to the dataset's count; a different value is an error."""
    if args.nb_classes is None:
        args.nb_classes = nb_classes
    elif args.nb_classes != nb_classes:
        raise utils.UsageError(
            f"--nb_classes {args.nb_classes} does not match the {nb_classes} classes of --data_set "
            f"{args.data_set}; pass --nb_classes {nb_classes} or leave it out"
        )


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """timm's ViT named by ``--model``, with MAE's pooling and a head for the dataset."""
    return build_encoder(args, args.nb_classes, args.drop_path)


def build_encoder(args: argparse.Namespace, num_classes: int, drop_path: float = 0.0) -> torch.nn.Module:
    """timm's ViT named by ``--model`` with ``--global_pool``'s pooling; ``num_classes=0`` gives
    the pooled features instead of logits."""
    utils.check_model_name(args.model, "vit_*")
    model = create_finetune_model(args.model, num_classes, args.input_size, args.global_pool, drop_path,
                                  **utils.patch_size_kwargs(args))
    patch = model.patch_embed.patch_size[0]
    if args.input_size % patch:
        raise utils.UsageError(f"--input_size {args.input_size} is not divisible by the patch size {patch}")
    return model


def load_finetune_weights(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """Put the pretrained encoder of ``--finetune`` into ``model``; its head starts fresh."""
    checkpoint = utils.load_checkpoint(Path(args.finetune))
    try:
        missing = load_pretrained_encoder(model, checkpoint)
    except CheckpointMismatchError as error:
        raise utils.UsageError(f"--finetune {args.finetune}: {error}") from error
    if utils.is_main_process():
        print(f"loaded the encoder of {args.finetune}; new: {', '.join(missing)}")


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


def build_eval_loader(dataset: Dataset, args: argparse.Namespace) -> DataLoader:
    """With ``--dist_eval`` rank r takes samples r, r + world, ...: no padding, so the summed
    counts see every sample exactly once. Otherwise every rank evaluates everything."""
    if args.dist_eval and args.distributed:
        dataset = Subset(dataset, range(args.rank, len(dataset), args.world_size))
    return DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
        pin_memory=args.pin_mem and args.device != "cpu", drop_last=False,
    )


def main(args: argparse.Namespace) -> Dict[str, float]:
    """Finetune (or with ``--eval`` only evaluate) as ``args`` say; returns the last test stats."""
    validate_args(args)
    return utils.run_distributed(run, args)


def run(args: argparse.Namespace, device: torch.device) -> Dict[str, float]:
    args.amp = utils.resolve_amp(args.amp, device)
    utils.seed_everything(args.seed, args.rank)
    train_set, val_set, _ = build_datasets(args)
    model = build_model(args)
    if args.finetune and not args.eval:
        load_finetune_weights(model, args)
    utils.check_writable_dir(args.output_dir, "--output_dir")  # only once the inputs are known good
    model.to(device)
    utils.use_fastest_attention(model, device, args.amp)
    val_loader = build_eval_loader(val_set, args)
    reduce_eval = args.dist_eval and args.distributed
    utils.resolve_lr(args)
    optimizer = create_optimizer(args, model, device)
    scaler = utils.make_grad_scaler(device, args.amp)
    checkpoint = utils.resume_training_state(args, model, optimizer, scaler)
    if args.eval:
        return evaluate_checkpoint(model, val_loader, device, args, checkpoint, reduce_eval)
    train_loader = build_train_loader(train_set, args)
    mixup_fn, criterion = build_criterion(args)
    train_batch = erasing_batch_transform(args)
    if utils.is_main_process():
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model {args.model}: {n_params / 1e6:.2f}M parameters; {len(train_set)} training and "
              f"{len(val_set)} evaluation images, {args.nb_classes} classes; effective batch "
              f"{args.eff_batch_size}; lr {args.lr:.3e} (blr {args.blr:g}); amp {args.amp}")
    loop = (model, criterion, train_loader, val_loader, optimizer, scaler, train_batch, mixup_fn)
    return train_and_evaluate(*loop, device, args, checkpoint, reduce_eval)


def evaluate_checkpoint(model, val_loader, device, args, checkpoint: Dict, reduce_eval: bool) -> Dict[str, float]:
    """``--eval``: the accuracy of the ``--resume`` checkpoint, printed and returned."""
    if not checkpoint:
        raise utils.UsageError("--eval needs a trained checkpoint: pass --resume PATH")
    stats = evaluate(model, val_loader, device, args.amp, normalizing_batch_transform(args), reduce=reduce_eval)
    if utils.is_main_process():
        print(f"accuracy on {stats['num_samples']} images: top-1 {stats['acc1']:.3f}%  "
              f"top-5 {stats['acc5']:.3f}%  loss {stats['loss']:.4f}")
    return stats


def train_and_evaluate(model, criterion, train_loader, val_loader, optimizer, scaler, train_batch, mixup_fn,
                       device, args, checkpoint: Dict, reduce_eval: bool) -> Dict[str, float]:
    """``run_epochs`` on the compiled, DDP-wrapped model with TensorBoard; a non-finite loss exits 1."""
    trained = utils.wrap_ddp(utils.maybe_compile(model, args.compile), device, args)
    loop = (trained, criterion, train_loader, val_loader, optimizer, scaler, train_batch, mixup_fn)
    with utils.training_writer(args.log_dir) as log_writer:
        return run_epochs(*loop, device, args, log_writer, checkpoint, reduce_eval)


def run_epochs(model, criterion, train_loader, val_loader, optimizer, scaler, train_batch, mixup_fn, device, args,
               log_writer, checkpoint: Dict, reduce_eval: bool) -> Dict[str, float]:
    """Train, evaluate and checkpoint each epoch; the best top-1 so far is kept in every checkpoint."""
    timer = utils.Timer()
    eval_batch = normalizing_batch_transform(args)
    test_stats: Dict[str, float] = {}
    max_accuracy = checkpoint.get("max_accuracy", 0.0)
    n_parameters = sum(p.numel() for p in model.parameters())
    for epoch in range(args.start_epoch, args.epochs):
        start = utils.epoch_start(train_loader, epoch, args, checkpoint)
        save_step = utils.step_saver(model, optimizer, scaler, epoch, args, max_accuracy=max_accuracy)
        train_stats = train_one_epoch(model, criterion, train_loader, optimizer, scaler, device, epoch, args,
                                      train_batch, mixup_fn, log_writer, **start, save_step=save_step)
        test_stats = evaluate(utils.unwrap_model(model), val_loader, device, args.amp, eval_batch, reduce=reduce_eval)
        improved = test_stats["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        utils.save_epoch(model, optimizer, scaler, epoch, args, max_accuracy=max_accuracy)
        if improved and args.output_dir:
            utils.save_training_state(Path(args.output_dir), ["checkpoint-best.pth"], model, optimizer, scaler,
                                      epoch, args, max_accuracy=max_accuracy)
        record = {f"train_{key}": value for key, value in train_stats.items()}
        record.update({f"test_{key}": value for key, value in test_stats.items()})
        record.update(epoch=epoch, max_accuracy=max_accuracy, n_parameters=n_parameters,
                      skipped_images=skipped_images(train_loader.dataset, device))
        utils.append_log(args.output_dir, record)
        if log_writer is not None:
            for key in ("acc1", "acc5", "loss"):
                log_writer.add_scalar(f"test/{key}", test_stats[key], epoch)
        if utils.is_main_process():
            print(json.dumps(record), flush=True)
            print(f"top-1 {test_stats['acc1']:.2f}% on {test_stats['num_samples']} images; best {max_accuracy:.2f}%")
    if not test_stats:  # resumed a finished run: report where it ended rather than nothing
        test_stats = evaluate(utils.unwrap_model(model), val_loader, device, args.amp, eval_batch, reduce=reduce_eval)
        if utils.is_main_process():
            print(f"nothing left to train (epoch {args.start_epoch} of {args.epochs}); the resumed model: "
                  f"top-1 {test_stats['acc1']:.2f}% on {test_stats['num_samples']} images; best {max_accuracy:.2f}%")
    if utils.is_main_process():
        print(f"training time {utils.format_eta(timer.elapsed())}")
    return test_stats


if __name__ == "__main__":
    utils.exit_on_usage_error(main, get_args_parser().parse_args())
