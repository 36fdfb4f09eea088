"""MAE linear probing: a BatchNorm + linear head on the frozen encoder, trained with LARS.

``python run_linear_probe.py --model vit_tiny_patch16_224 --input_size 64 --finetune CKPT`` runs on
the synthetic dataset anywhere; without ``--finetune`` it probes a randomly initialized encoder,
the baseline. ``torchrun --nproc_per_node 8 run_linear_probe.py --data_path /imagenet --finetune
mae_pretrain_vit_base.pth --batch_size 512 --accum_iter 4 --dist_eval`` is the paper's ImageNet
recipe (effective batch 16384).
"""
import argparse
from typing import Callable, Dict

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

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
from image_data.augmentation import CLASSIFY_CROP_SCALE, Crops, build_pil_pretraining_transform, eval_transform
from optim_factory import create_lars
from training.checkpoint import TrainingState
from training.cli import add_crop_args, add_run_args, add_schedule_args
from training.config import resolve_classification
from training.output_dir import claim_output_dir
from training.wrapping import wrap_model


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
    parser = argparse.ArgumentParser("MAE linear probing", add_help=True)
    parser.add_argument("--batch_size", default=512, type=int, help="images per GPU per step")
    parser.add_argument("--epochs", default=90, type=int, help="length of the schedule")
    parser.add_argument("--accum_iter", default=1, type=int, help="micro-steps per optimizer step")
    add_encoder_args(parser, global_pool=False)
    optimizer = parser.add_argument_group("optimizer")
    optimizer.add_argument("--weight_decay", default=0.0, type=float, help="LARS weight decay of the head's weights")
    add_schedule_args(parser, blr=0.1, min_lr=0.0, warmup_epochs=10)
    add_crop_args(parser.add_argument_group("augmentation"), crop_scale=CLASSIFY_CROP_SCALE)
    add_data_args(parser)
    add_evaluation_args(parser)
    add_run_args(parser)
    return parser


def probe_transform(args: argparse.Namespace, is_train: bool) -> Callable:
    """RandomResizedCrop and flip for training, as MAE probes; finetuning's evaluation transform.
    Both end in uint8, normalized on the device (``normalizing_batch_transform``)."""
    if not is_train:
        return eval_transform(args.input_size, args.in_chans)
    return build_pil_pretraining_transform(Crops(args.input_size, tuple(args.crop_scale), args.hflip), args.in_chans)


def build_probe(args: argparse.Namespace) -> LinearProbe:
    """The encoder of ``--finetune`` (random without it) under a new head."""
    encoder = build_encoder(args, num_classes=0)
    if args.finetune and not args.eval:
        load_finetune_weights(encoder, args)
    return LinearProbe(encoder, args.nb_classes)


def main(args: argparse.Namespace) -> Dict[str, float]:
    """Probe (or with ``--eval`` only evaluate) as ``args`` say; returns the last test stats."""
    return utils.run_distributed(run, resolve_classification(args, fsdp=False, grad_checkpointing=False))


def run(args: argparse.Namespace, device: torch.device) -> Dict[str, float]:
    utils.seed_everything(args.seed)  # no rank: a random encoder must be the same on every rank
    train_set, val_set, _ = build_datasets(args, probe_transform, train=not args.eval)
    model = build_probe(args)
    with claim_output_dir(args.output_dir, lock=not args.eval):  # once the inputs are known good; held to the end
        model.to(device)
        val_loader = build_eval_loader(val_set, args)
        reduce_eval = args.dist_eval and args.distributed
        optimizer = create_lars(model, args.lr, args.weight_decay)
        state = TrainingState(wrap_model(model, device, args), optimizer, utils.make_grad_scaler(device, args.amp))
        if args.eval:
            return evaluate_checkpoint(state, val_loader, normalizing_batch_transform(args), device=device, args=args,
                                       reduce=reduce_eval)
        task = ClassificationTask(
            criterion=nn.CrossEntropyLoss(), train_loader=build_train_loader(train_set, args), val_loader=val_loader,
            train_batch=normalizing_batch_transform(args), eval_batch=normalizing_batch_transform(args),
            reduce_eval=reduce_eval,
        )
        if utils.is_main_process():
            n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            source = args.finetune or "a random initialization"
            print(f"linear probe on {args.model} from {source}: {n_trainable} trainable parameters; "
                  f"{len(train_set)} training and {len(val_set)} evaluation images, {args.nb_classes} classes; "
                  f"effective batch {args.eff_batch_size}; lr {args.lr:.3e} (blr {args.blr:g}); amp {args.amp}")
        return train_and_evaluate(state, task, device=device, args=args)


if __name__ == "__main__":
    utils.exit_on_usage_error(main, get_args_parser().parse_args())
