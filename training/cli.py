"""The command-line flags the run_* scripts share, and the checks of what a flag names (a model
timm registers, a size the patches tile) that ``training.config`` and the builders run before
anything is written (one ``error:`` line, exit code 2); the ranges of numeric flags are
``training.settings``'s."""
import argparse
import difflib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch

from image_data.files import DEFAULT_MAX_IMAGE_PIXELS
from image_data.geometry import to_grid
from image_data.remote import Retrying
from image_data.shard_cache import DEFAULT_CACHE_GB
from training.precision import add_amp_arg
from training.trackers import TRACKERS
from utils import UsageError


def add_schedule_args(parser: argparse.ArgumentParser, *, blr: float, min_lr: float, warmup_epochs: float) -> None:
    """Learning-rate flags shared by pretraining and finetuning, with each stage's defaults."""
    group = parser.add_argument_group("schedule")
    group.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr * effective batch / 256)")
    group.add_argument("--blr", default=blr, type=float, help="base lr per 256 images")
    group.add_argument("--min_lr", default=min_lr, type=float, help="lr at the end of the cosine")
    group.add_argument("--warmup_epochs", default=warmup_epochs, type=float, help="linear warmup length")
    group.add_argument("--clip_grad", default=None, type=float, help="clip the gradient norm (default: no clipping)")


def add_loading_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Data flags shared by both stages; returns the group so a stage can add its own."""
    group = parser.add_argument_group("data")
    group.add_argument("--num_samples", default=None, type=int, help="use only the first N samples")
    group.add_argument("--in_chans", default=None, type=int,
                       help="image channels: 3 (RGB), 1 (grayscale, 16-bit kept), 4 (RGBA) or any with .npy arrays "
                            "(default: the checkpoint's, else 3)")
    group.add_argument("--mean", default=None, type=float, nargs="+",
                       help="normalization mean, one per channel (default: ImageNet's for RGB)")
    group.add_argument("--std", default=None, type=float, nargs="+",
                       help="normalization std, one per channel (default: ImageNet's for RGB)")
    group.add_argument("--num_workers", default=10, type=int, help="data-loader processes per GPU")
    group.add_argument("--shard_cache", default=None, type=str,
                       help="shards in object storage (s3://, gs://, az://, https://): the local folder they are "
                            "downloaded into, shared by the ranks of a host (default: output_dir/shard_cache)")
    group.add_argument("--shard_cache_gb", default=DEFAULT_CACHE_GB, type=float,
                       help="the shard cache's limit; the least recently used shards are evicted past it")
    group.add_argument("--shard_retries", default=Retrying().retries, type=int,
                       help="retries of a shard download that failed on a timeout, a 5xx or throttling, waiting "
                            "1 s, 2 s, 4 s, ... up to 30 s between them")
    group.add_argument("--max_image_pixels", default=DEFAULT_MAX_IMAGE_PIXELS, type=int,
                       help="images with more pixels are skipped as unreadable (PIL's decompression-bomb limit; "
                            "raise it for datasets of large images)")
    group.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True,
                       help="pin host memory for faster copies to the GPU")
    return group


DEFAULT_SHUFFLE_WINDOW = 16  # shards; benchmarks/RESULTS.md, "Tar shards"


def add_shuffle_arg(group: argparse._ArgumentGroup) -> None:
    """``--shuffle_window``, for the scripts that train on shuffled data."""
    group.add_argument("--shuffle_window", default=DEFAULT_SHUFFLE_WINDOW, type=int,
                       help="tar shards: each stretch of an epoch reads this many shards, its samples shuffled "
                            "across them (image folders shuffle over all images)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Output, device, precision, seeding, resuming and launcher flags shared by both stages."""
    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", default="./output_dir", type=str, help="checkpoints, log.txt, pictures")
    group.add_argument("--log_dir", default=None, type=str, help="TensorBoard logs (default: output_dir/tensorboard)")
    group.add_argument("--report_to", default=["tensorboard"], nargs="+", choices=TRACKERS, metavar="TRACKER",
                       help="where the curves go: any of tensorboard, wandb, mlflow, or none (W&B and MLflow read "
                            "their usual environment: WANDB_MODE, WANDB_PROJECT, MLFLOW_TRACKING_URI, ...)")
    group.add_argument("--run_name", default=None, type=str,
                       help="the W&B and MLflow run's name (default: the output folder's name)")
    add_device_args(group)
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the model (slow first steps, faster after; see benchmarks/RESULTS.md)")
    group.add_argument("--seed", default=0, type=int)
    group.add_argument("--resume", default="", help="checkpoint to continue from")
    group.add_argument("--auto_resume", action=argparse.BooleanOptionalAction, default=True,
                       help="continue from the newest checkpoint in output_dir")
    group.add_argument("--start_epoch", default=0, type=int)
    group.add_argument("--save_ckpt_freq", default=20, type=int, help="keep checkpoint-{epoch}.pth every N epochs")
    group.add_argument("--save_ckpt_steps", default=0, type=int,
                       help="also write checkpoint-last.pth every N optimizer steps (0: at epoch ends only)")
    group.add_argument("--print_freq", default=20, type=int, help="progress line every N steps")
    group.add_argument("--preempt_signals", default=["TERM", "USR1"], nargs="+", metavar="SIGNAL",
                       help="on these signals finish the step, write checkpoint-last.pth and exit with 128 + the "
                            "signal's number ('none': die at once, as without handling); Ctrl-C (SIGINT) always "
                            "does the same")
    group.add_argument("--requeue", action="store_true",
                       help="after a preemption signal (not Ctrl-C), rank 0 requeues the SLURM job (scontrol requeue)")


def add_size_args(group: argparse._ArgumentGroup) -> None:
    """``--input_size`` (H W, or one value for a square) and ``--patch_size``."""
    group.add_argument("--input_size", default=[224], type=int, nargs="+", metavar="SIZE",
                       help="image size in pixels: one value for a square, or H W")
    group.add_argument("--patch_size", default=None, type=int,
                       help="patch side in pixels, instead of the model's (e.g. 8 or 4 for small images)")


def add_crop_args(group: argparse._ArgumentGroup, *, crop_scale: Tuple[float, float]) -> None:
    """The training crops' share of the image and the chance of a horizontal flip."""
    group.add_argument("--crop_scale", default=list(crop_scale), type=float, nargs=2, metavar=("MIN", "MAX"),
                       help=f"RandomResizedCrop's share of the image (default: {crop_scale[0]:g} {crop_scale[1]:g})")
    group.add_argument("--hflip", default=0.5, type=float,
                       help="chance of a horizontal flip (0 for text, digits, or images whose sides differ)")


def add_memory_args(parser: argparse.ArgumentParser) -> None:
    """FSDP2 and activation checkpointing, for models and batches past one GPU's memory."""
    group = parser.add_argument_group("memory")
    group.add_argument("--fsdp", action="store_true",
                       help="shard weights, gradients and optimizer state over the processes (FSDP2); "
                            "checkpoints become folders of shards")
    group.add_argument("--grad_checkpointing", action="store_true",
                       help="recompute each block's activations in the backward pass instead of keeping them")


def add_device_args(group: argparse._ArgumentGroup) -> None:
    """Device, precision and launcher flags: all that a script which only runs a model needs."""
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_amp_arg(group, default=None, help="mixed precision (default: bf16 on GPUs that support it, none on CPU)")
    group.add_argument("--local_rank", "--local-rank", default=None, type=int,
                       help="set by torch.distributed.launch; the environment wins")
    group.add_argument("--dist_timeout", default=None, type=float, metavar="MINUTES",
                       help="how long a collective waits for a rank that does not come before the run stops "
                            "(default: torch's, 10 minutes on NCCL, 30 on gloo); docs/clusters.md")


def one_size(size: Union[int, Sequence[int]]) -> Union[int, List[int]]:
    """``--input_size`` as an int for a square (as checkpoints have always stored it), else [H, W]."""
    if isinstance(size, int):
        return size
    if len(size) not in (1, 2):
        raise UsageError(f"--input_size takes one value (a square) or two (H W), got {len(size)}")
    return size[0] if len(size) == 1 or size[0] == size[1] else list(size)


# ----------------------------------------------------------------------------- models


def check_model_name(name: str, pattern: str) -> None:
    """Refuse a ``--model`` that timm does not register under ``pattern``, naming the closest."""
    known = timm.list_models(pattern)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5) or known[:3]
        raise UsageError(f"unknown --model {name}; did you mean {' or '.join(close)}? "
                         f"(all: timm.list_models({pattern!r}))")


def patch_size_kwargs(patch_size: Optional[int]) -> Dict[str, int]:
    """``patch_size`` for ``timm.create_model`` when ``--patch_size`` overrides the model's."""
    return {} if patch_size is None else {"patch_size": patch_size}


def check_patch_grid(model: torch.nn.Module, input_size: Union[int, Sequence[int]]) -> None:
    """Refuse an ``--input_size`` that the model's patches do not tile."""
    patch = model.patch_embed.patch_size[0]
    if any(side % patch for side in to_grid(input_size)):
        shown = input_size if isinstance(input_size, int) else " ".join(map(str, input_size))
        raise UsageError(f"--input_size {shown} is not divisible by the patch size {patch}")
