"""MAE linear probing, two ways.

``--protocol mae`` (the default) is the paper's: a BatchNorm + linear head on the frozen encoder,
trained with LARS on augmented images; ``torchrun --nproc_per_node 8 run_linear_probe.py --data_path
/imagenet --finetune mae_pretrain_vit_base.pth --batch_size 512 --accum_iter 4 --dist_eval`` is its
ImageNet recipe (effective batch 16384). ``--protocol sweep`` extracts the features once and trains
a grid of linear heads over them, chosen on a held-out tenth of the training split
(``evaluation.linear_sweep``): what measures the features at any batch size and scale. Without
``--finetune`` either probes a randomly initialized encoder, the baseline.
"""
import argparse
import functools
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

import utils
from datasets import build_train_loader
from engine_for_finetuning import ClassificationTask, evaluate_checkpoint, train_and_evaluate
from evaluation.features import FEATURES, cached_features, check_pixel_floor, extract_features, token_features
from evaluation.linear_sweep import LEARNING_RATES, MIN_STEPS, WEIGHT_DECAYS, sweep
from evaluation.setup import (
    add_data_args,
    add_encoder_args,
    add_evaluation_args,
    build_datasets,
    build_encoder,
    build_eval_loader,
    load_finetune_weights,
    normalizing_batch_transform,
    unaugmented,
)
from image_data.augmentation import CLASSIFY_CROP_SCALE, Crops, build_pil_pretraining_transform, eval_transform
from optim_factory import create_lars
from training import precision
from training.checkpoint import TrainingState
from training.cli import add_crop_args, add_run_args, add_schedule_args
from training.config import (
    encoder_of,
    eval_loading_of,
    labelled_data_of,
    loading_of,
    process_group_of,
    resolve_classification,
    save_run_config,
    resuming_of,
    training_of,
    wrapping_of,
)
from training.config_file import ConfigArgumentParser
from training.output_dir import claim_output_dir
from training.wrapping import wrap_model

PROTOCOLS = ("mae", "sweep")


class LinearProbe(nn.Module):
    """A frozen encoder and a trainable ``BatchNorm1d`` (no affine, eps 1e-6) + ``Linear`` head.

    The encoder stays in eval mode even while the probe trains (dropout, drop path and any
    norm statistics are those of the pretrained network); only the head's BatchNorm switches.
    """

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.head = nn.Sequential(
            nn.BatchNorm1d(encoder.num_features, affine=False, eps=1e-6),
            nn.Linear(encoder.num_features, num_classes),
        )
        trunc_normal_(self.head[1].weight, std=0.01)  # MoCo v3's init, as MAE's probe
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # nothing flows back into the frozen encoder
            features = self.encoder(imgs)  # (B, D): cls token, or pooled patch tokens
        return self.head(features)  # (B, classes)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser("MAE linear probing", add_help=True)
    parser.add_argument("--batch_size", default=512, type=int, help="images per GPU per step")
    parser.add_argument("--epochs", default=90, type=int, help="length of the schedule")
    parser.add_argument("--accum_iter", default=1, type=int, help="micro-steps per optimizer step")
    add_encoder_args(parser, global_pool=False)
    optimizer = parser.add_argument_group("optimizer")
    optimizer.add_argument("--weight_decay", default=0.0, type=float, help="LARS weight decay of the head's weights")
    add_schedule_args(parser, blr=0.1, min_lr=0.0, warmup_epochs=10)
    add_crop_args(parser.add_argument_group("augmentation"), crop_scale=CLASSIFY_CROP_SCALE)
    add_protocol_args(parser)
    add_data_args(parser, trains=True)
    add_evaluation_args(parser)
    add_run_args(parser)
    return parser


def add_protocol_args(parser: argparse.ArgumentParser) -> None:
    """``--protocol`` and the fast probe's grid (docs/evaluation.md, "Linear probing")."""
    group = parser.add_argument_group("protocol")
    group.add_argument("--protocol", default="mae", choices=PROTOCOLS,
                       help="mae: the paper's (LARS, augmented images, its batch of 16384); sweep: a grid of linear "
                            "heads on features extracted once, chosen on a held-out tenth of the training split")
    group.add_argument("--features", default=None, choices=FEATURES,
                       help="sweep: the cls token, the average of the patch tokens, both side by side, or the "
                            "normalized pixels without an encoder (the raw-pixel floor) (default: avgpool with "
                            "--global_pool, else cls)")
    group.add_argument("--sweep_lrs", default=list(LEARNING_RATES), type=float, nargs="+", metavar="LR",
                       help="sweep: the heads' learning rates (SGD, momentum 0.9, cosine)")
    group.add_argument("--sweep_weight_decays", default=list(WEIGHT_DECAYS), type=float, nargs="+", metavar="WD",
                       help="sweep: the heads' weight decays; every pair with --sweep_lrs is a head")
    group.add_argument("--sweep_epochs", default=10, type=float,
                       help=f"sweep: passes over the features (at least {MIN_STEPS} steps)")
    group.add_argument("--sweep_batch_size", default=1024, type=int, help="sweep: features per step")
    group.add_argument("--cache_features", action=argparse.BooleanOptionalAction, default=True,
                       help="sweep: keep the features in output_dir/features and reuse them for the same encoder, "
                            "weights and data")


def probe_transform(args: argparse.Namespace, is_train: bool) -> Callable:
    """RandomResizedCrop and flip for training, as MAE probes; finetuning's evaluation transform.
    Both end in uint8, normalized on the device (``normalizing_batch_transform``)."""
    if not is_train:
        return eval_transform(args.input_size, args.in_chans)
    return build_pil_pretraining_transform(Crops(args.input_size, tuple(args.crop_scale), args.hflip), args.in_chans)


def build_probe(args: argparse.Namespace) -> LinearProbe:
    """The encoder of ``--finetune`` (random without it) under a new head."""
    encoder = build_encoder(encoder_of(args), num_classes=0)
    if args.finetune and not args.eval:
        load_finetune_weights(encoder, args.finetune)
    return LinearProbe(encoder, args.nb_classes)


def main(args: argparse.Namespace) -> Dict[str, float]:
    """Probe (or with ``--eval`` only evaluate) as ``args`` say; returns the last test stats."""
    args = resolve_classification(args, fsdp=False, grad_checkpointing=False)
    check_pixel_floor(features=args.features, finetune=args.finetune)
    if args.features == "pixels" and args.protocol != "sweep":
        raise utils.UsageError("--features pixels is the sweep's raw-pixel floor: give it with --protocol sweep")
    protocol = run_sweep if args.protocol == "sweep" else run
    return utils.run_distributed(functools.partial(protocol, args), process_group_of(args))


def run(args: argparse.Namespace, device: torch.device) -> Dict[str, float]:
    utils.seed_everything(args.seed)  # no rank: a random encoder must be the same on every rank
    train_set, val_set, _ = build_datasets(labelled_data_of(args), functools.partial(probe_transform, args),
                                           train=not args.eval)
    model = build_probe(args)
    with claim_output_dir(args.output_dir, lock=not args.eval):  # once the inputs are known good; held to the end
        model.to(device)
        eval_loading = eval_loading_of(args)
        val_loader = build_eval_loader(val_set, eval_loading)
        normalizing = normalizing_batch_transform(mean=args.mean, std=args.std)
        optimizer = create_lars(model, args.lr, args.weight_decay)
        state = TrainingState(wrap_model(model, device, wrapping_of(args)), optimizer,
                              precision.make_grad_scaler(device, args.amp))
        if args.eval:
            return evaluate_checkpoint(state, val_loader, normalizing, device=device, resuming=resuming_of(args),
                                       amp=args.amp, reduce=eval_loading.split)
        train_loader = build_train_loader(train_set, loading_of(args))
        warn_if_the_head_cannot_move(args, optimizer_steps=args.epochs * len(train_loader) // args.accum_iter)
        task = ClassificationTask(
            criterion=nn.CrossEntropyLoss(), train_loader=train_loader, val_loader=val_loader,
            train_batch=normalizing, eval_batch=normalizing, reduce_eval=eval_loading.split,
        )
        if utils.is_main_process():
            n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            source = args.finetune or "a random initialization"
            print(f"linear probe on {args.model} from {source}: {n_trainable} trainable parameters; "
                  f"{len(train_set)} training and {len(val_set)} evaluation images, {args.nb_classes} classes; "
                  f"effective batch {args.eff_batch_size}; lr {args.lr:.3e} (blr {args.blr:g}); amp {args.amp}")
        return train_and_evaluate(state, task, device=device, training=training_of(args, get_args_parser()))


def head_movement(lr: float, optimizer_steps: int, momentum: float = 0.9) -> float:
    """How far LARS can move the head over the run, in units of its own norm: each step changes a
    weight matrix by at most trust coefficient (0.001) x lr of its norm, momentum multiplies that
    by 1 / (1 - momentum), and warmup and cosine average it to about half."""
    return 0.001 * lr / (1 - momentum) * 0.5 * optimizer_steps


# the paper's probe: ImageNet's 1,281,167 images, batch 16384, lr 6.4, 90 epochs (7,020 steps)
PAPER_HEAD_MOVEMENT = head_movement(6.4, 90 * (1_281_167 // 16384))


def warn_if_the_head_cannot_move(args: argparse.Namespace, optimizer_steps: int) -> None:
    """The paper's protocol is tuned for its batch of 16384 and about 7,000 steps; far from them
    (a small batch scales the lr down, a small set gives few steps) the head stays near its
    initialization and the probe reports little more than chance: say so once."""
    movement = head_movement(args.lr, optimizer_steps)
    if utils.is_main_process() and movement < PAPER_HEAD_MOVEMENT / 20:
        print(f"warning: --protocol mae at lr {args.lr:.3g} for {optimizer_steps} optimizer steps lets LARS move "
              f"the head by about {movement:.2g} times its norm, against {PAPER_HEAD_MOVEMENT:.0f} in the paper's "
              "ImageNet probe (batch 16384, lr 6.4, 90 epochs): expect an accuracy near chance that says little "
              "about the features. --protocol sweep measures them at any batch size (docs/evaluation.md, 'Linear probing')",
              flush=True)


def feature_kind(args: argparse.Namespace) -> str:
    return args.features or ("avgpool" if args.global_pool else "cls")


def weights_identity(path: str) -> Dict[str, Any]:
    """What names the weights in the feature cache: the file, its size and time (a new
    pretraining into the same folder makes new features), or the seed of a random encoder."""
    if not path:
        return {"random_init": True}
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime": stat.st_mtime}


def run_sweep(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """``--protocol sweep`` on every rank (a collective): features of both splits (cached), the grid
    of heads, one log line whose ``test_acc1`` is the validation top-1 of the head chosen on the
    held-out tenth."""
    utils.seed_everything(args.seed)  # no rank: a random encoder must be the same on every rank
    train_set, val_set, _ = build_datasets(
        labelled_data_of(args), unaugmented(input_size=args.input_size, in_chans=args.in_chans), train=True)
    encoder = build_encoder(encoder_of(args), num_classes=0)
    if args.finetune:
        load_finetune_weights(encoder, args.finetune)
    with claim_output_dir(args.output_dir):
        save_run_config(args, get_args_parser())
        timer = utils.Timer()
        encoder.to(device)
        kind = feature_kind(args)
        extracting = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=device, amp=args.amp,
                          batch_transform=normalizing_batch_transform(mean=args.mean, std=args.std),
                          embed=token_features(kind))
        describe = {"model": args.model, "weights": weights_identity(args.finetune), "seed": args.seed,
                    "features": kind, "input_size": args.input_size, "patch_size": args.patch_size,
                    "in_chans": args.in_chans, "mean": args.mean, "std": args.std, "data_set": args.data_set,
                    "data_path": args.data_path, "eval_data_path": args.eval_data_path,
                    "num_samples": args.num_samples, "amp": args.amp}
        cache = Path(args.output_dir) / "features" if args.cache_features and args.output_dir else None
        train, val = (cached_features(cache, {**describe, "split": split},
                                      lambda dataset=dataset: extract_features(encoder, dataset, **extracting))
                      for split, dataset in (("train", train_set), ("val", val_set)))
        extracted = timer.elapsed()
        chosen, heads = sweep(train, val, num_classes=args.nb_classes, lrs=args.sweep_lrs,
                              weight_decays=args.sweep_weight_decays, epochs=args.sweep_epochs,
                              batch_size=args.sweep_batch_size, seed=args.seed)
        record = {"protocol": "sweep", "test_acc1": chosen.val_acc1, "test_acc5": chosen.val_acc5,
                  "held_out_acc1": chosen.held_out_acc1, "lr": chosen.lr, "weight_decay": chosen.weight_decay,
                  "test_acc1_best_on_val": max(head.val_acc1 for head in heads), "features": kind,
                  "num_train": len(train_set), "num_val": len(val_set), "finetune": args.finetune,
                  "extract_s": extracted, "sweep_s": timer.elapsed() - extracted,
                  "heads": [asdict(head) for head in heads]}
        utils.append_log(args.output_dir, record)
        if utils.is_main_process():
            print(f"chosen on the held-out tenth of the training split: lr {chosen.lr:g}, weight decay "
                  f"{chosen.weight_decay:g} ({chosen.held_out_acc1:.2f}% there); top-1 {chosen.val_acc1:.2f}% on "
                  f"{len(val_set)} validation images (the best head on them: {record['test_acc1_best_on_val']:.2f}%, "
                  f"an optimistic bound); {extracted:.0f} s of features, {record['sweep_s']:.0f} s of heads",
                  flush=True)
    return {**record, "acc1": chosen.val_acc1}


if __name__ == "__main__":
    utils.exit_on_usage_error(main, get_args_parser().parse_args())
