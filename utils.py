"""Shared helpers of the run_* scripts: distribution, precision, schedule, checkpoints, logs."""
import argparse
import ctypes
import datetime
import difflib
import json
import math
import os
import pickle
import random
import subprocess
import sys
import time
from collections import defaultdict, deque
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, TypeVar

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


class UsageError(Exception):
    """Bad input from the command line or the files it names: one line, exit code 2."""


def exit_on_usage_error(main_fn, args: argparse.Namespace) -> None:
    """Run ``main_fn(args)``; a ``UsageError`` becomes one clear line on stderr and exit 2."""
    try:
        main_fn(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- command line


def add_schedule_args(parser: argparse.ArgumentParser, blr: float, min_lr: float, warmup_epochs: float) -> None:
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
    group.add_argument("--mean", default=list(IMAGENET_DEFAULT_MEAN), type=float, nargs=3, help="normalization mean")
    group.add_argument("--std", default=list(IMAGENET_DEFAULT_STD), type=float, nargs=3, help="normalization std")
    group.add_argument("--num_workers", default=10, type=int, help="data-loader processes per GPU")
    group.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True,
                       help="pin host memory for faster copies to the GPU")
    return group


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Output, device, precision, seeding, resuming and launcher flags shared by both stages."""
    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", default="./output_dir", type=str, help="checkpoints, log.txt, pictures")
    group.add_argument("--log_dir", default=None, type=str, help="TensorBoard logs (default: output_dir/tensorboard)")
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


def add_device_args(group: argparse._ArgumentGroup) -> None:
    """Device, precision and launcher flags: all that a script which only runs a model needs."""
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                       help="mixed precision (default: bf16 on GPUs that support it, none on CPU)")
    group.add_argument("--local_rank", "--local-rank", default=None, type=int,
                       help="set by torch.distributed.launch; the environment wins")


def patch_size_kwargs(args: argparse.Namespace) -> Dict[str, int]:
    """``patch_size`` for ``timm.create_model`` when ``--patch_size`` overrides the model's."""
    if args.patch_size is None:
        return {}
    if args.patch_size < 1:
        raise UsageError(f"--patch_size must be at least 1, got {args.patch_size}")
    return {"patch_size": args.patch_size}


def check_model_name(name: str, pattern: str) -> None:
    """Refuse a ``--model`` that timm does not register under ``pattern``, naming the closest."""
    known = timm.list_models(pattern)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5) or known[:3]
        raise UsageError(f"unknown --model {name}; did you mean {' or '.join(close)}? (all: timm.list_models({pattern!r}))")


def validate_common_args(args: argparse.Namespace) -> None:
    """Checks both stages need before anything is built or written."""
    for flag in ("batch_size", "accum_iter", "epochs", "save_ckpt_freq", "print_freq"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.clip_grad is not None and args.clip_grad <= 0:
        raise UsageError(f"--clip_grad must be a positive norm, got {args.clip_grad}; leave it out for no clipping")
    if args.save_ckpt_steps < 0:
        raise UsageError(f"--save_ckpt_steps must be 0 (off) or positive, got {args.save_ckpt_steps}")
    if args.num_samples is not None and args.num_samples < 1:
        raise UsageError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.log_dir is None and args.output_dir:
        args.log_dir = str(Path(args.output_dir) / "tensorboard")


# ----------------------------------------------------------------------------- distribution


def slurm_master_addr() -> str:
    """The first host of the SLURM allocation, which every task can reach."""
    nodes = os.environ["SLURM_JOB_NODELIST"]
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
    return hosts.stdout.split()[0]


def read_launch_env(args: argparse.Namespace) -> None:
    """Set ``args.rank``, ``args.world_size`` and ``args.local_rank`` from the launcher.

    torchrun and ``torch.distributed.launch`` export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
    under ``srun`` SLURM's own variables say the same. Otherwise this is a single process.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        args.rank, args.world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        args.local_rank = int(env.get("LOCAL_RANK", args.local_rank or 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        args.rank, args.world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        args.local_rank = int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_ADDR", slurm_master_addr())
        env.setdefault("MASTER_PORT", "29500")
    else:
        args.rank, args.world_size, args.local_rank = 0, 1, 0
    args.distributed = args.world_size > 1


def init_distributed(args: argparse.Namespace) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU) and return this process's device."""
    read_launch_env(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no GPU is visible; use --device cpu")
        device = torch.device("cuda", args.local_rank)
        torch.cuda.set_device(device)
    if device.type == "cpu":
        reuse_freed_memory()
    if args.distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=args.rank, world_size=args.world_size)
        dist.barrier()
    return device


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's <malloc.h>
MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest mmap threshold glibc accepts on 64-bit machines
TRIM_THRESHOLD = 2**31 - 1  # the largest a C int holds: freed memory stays with the process


def reuse_freed_memory() -> bool:
    """Have glibc's malloc serve blocks up to 32 MiB from its heap and keep what is freed there.

    A CPU training step frees and allocates the same large tensors every step (autocast's bf16
    copies of the weights, their fp32 gradients, activations). By default glibc maps blocks over
    a threshold with fresh pages, which fault in on first touch, and hands them back when freed:
    on the 2-core EPYC a ViT-B/16 step faulted in 8,000-67,000 pages, its weight casts took twice
    as long, and the step was 4% longer on the median of five alternated runs
    (benchmarks/RESULTS.md). The process keeps its peak memory in exchange, which a training run
    reaches every step anyway. Returns False, changing nothing,
    where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity on one process)."""
    return all_reduce_sum(values) / get_world_size()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity on one process)."""
    if get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


Result = TypeVar("Result")


def run_distributed(run: Callable[[argparse.Namespace, torch.device], Result], args: argparse.Namespace) -> Result:
    """``run(args, device)`` inside the process group ``args`` ask for, torn down however it ends,
    so a failed rank does not leave the others waiting in a collective."""
    device = init_distributed(args)
    try:
        return run(args, device)
    finally:
        cleanup_distributed()


def seed_everything(*key: int) -> None:
    """Seed torch (all devices), NumPy and ``random`` from a key of integers, mixed by NumPy's
    SeedSequence so neighbouring keys (ranks, steps) give unrelated streams."""
    words = np.random.SeedSequence([int(k) for k in key]).generate_state(4)  # (4,) uint32
    torch.manual_seed(int(words[0]) << 32 | int(words[1]))
    np.random.seed(words)
    random.seed(int(words[2]) << 32 | int(words[3]))


# ----------------------------------------------------------------------------- precision


def resolve_amp(amp: Optional[str], device: torch.device) -> str:
    """bf16 by default on GPUs that have it; full precision on CPU unless asked."""
    if amp is not None:
        return amp
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "none"


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> ContextManager:
    """The one precision switch: autocast to bf16/fp16, or nothing."""
    if amp == "none":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def make_grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """Loss scaling only for fp16; disabled it passes everything through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


# ----------------------------------------------------------------------------- schedule


def lr_at(epoch: float, args: argparse.Namespace) -> float:
    """Linear warmup to ``args.lr``, then a half-cosine to ``args.min_lr``; ``epoch`` is fractional."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply ``lr`` to every group, scaled by the group's layer-decay ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def resolve_lr(args: argparse.Namespace) -> None:
    """``lr = blr * effective batch / 256`` unless ``--lr`` is given, as in MAE."""
    args.eff_batch_size = args.batch_size * args.accum_iter * args.world_size
    if args.lr is None:
        args.lr = args.blr * args.eff_batch_size / 256


# ----------------------------------------------------------------------------- checkpoints


def plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The run's arguments as plain Python values, so checkpoints load with weights_only."""
    def plain(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return str(value)

    return {key: plain(value) for key, value in vars(args).items()}


def save_atomic(payload: Mapping[str, Any], path: Path) -> None:
    """Write to a temporary file, fsync, then rename: a kill leaves the old file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(dict(payload), handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CorruptCheckpointError(UsageError):
    """A checkpoint file that is truncated or damaged (a crash mid-copy, a full disk)."""


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load tensors and plain values only; refuse anything that would run code."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused a global: its code never ran
        raise UsageError(
            f"checkpoint {path} holds Python objects that would run code when unpickled "
            f"({' '.join(str(error).split())[:200]}); refused: only tensors and plain values are accepted"
        ) from error
    except Exception as error:  # zip, EOF and storage errors all mean a damaged file
        raise CorruptCheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        ) from error


def checkpoint_epoch(path: Path) -> int:
    """The epoch number in ``checkpoint-{epoch}.pth``; -1 for other names."""
    stem = path.stem.rsplit("-", 1)[-1]
    return int(stem) if stem.isdigit() else -1


def resume_candidates(output_dir: Path) -> List[Path]:
    """``checkpoint-last.pth``, then the numbered checkpoints, newest first."""
    output_dir = Path(output_dir)
    numbered = [path for path in output_dir.glob("checkpoint-*.pth") if checkpoint_epoch(path) >= 0]
    last = [output_dir / "checkpoint-last.pth"] if (output_dir / "checkpoint-last.pth").is_file() else []
    return last + sorted(numbered, key=checkpoint_epoch, reverse=True)


def find_resume_checkpoint(args: argparse.Namespace) -> Tuple[Optional[Path], Dict[str, Any]]:
    """``--resume``'s checkpoint, or with ``--auto_resume`` the newest readable one in output_dir
    (a damaged one is reported and the next older one used)."""
    if args.resume:
        return Path(args.resume), load_checkpoint(Path(args.resume))
    if not (args.auto_resume and args.output_dir):
        return None, {}
    for path in resume_candidates(Path(args.output_dir)):
        try:
            return path, load_checkpoint(path)
        except CorruptCheckpointError as error:
            print(f"warning: {error}; trying the next older checkpoint", file=sys.stderr, flush=True)
    return None, {}


def state_mismatch(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """The missing, unexpected and wrongly shaped keys of ``state`` for ``model``; '' if it fits."""
    own = model.state_dict()
    shapes = [f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
              for key in sorted(own.keys() & state.keys()) if tuple(state[key].shape) != tuple(own[key].shape)]
    parts = {"missing": sorted(own.keys() - state.keys()), "unexpected": sorted(state.keys() - own.keys()),
             "shapes (checkpoint vs model)": shapes}
    return "; ".join(f"{name}: {', '.join(keys[:8])}" + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
                     for name, keys in parts.items() if keys)


def save_training_state(
    output_dir: Path, names: Iterable[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, epoch: int, args: argparse.Namespace, **extra: Any,
) -> None:
    """Write one checkpoint under each of ``names`` (main process only)."""
    if not is_main_process():
        return
    payload = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "args": plain_args(args),
        **extra,
    }
    for name in names:
        save_atomic(payload, Path(output_dir) / name)


def save_epoch(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, epoch: int,
    args: argparse.Namespace, **extra: Any,
) -> None:
    """``checkpoint-last.pth`` every epoch; ``checkpoint-{epoch}.pth`` every ``--save_ckpt_freq``
    epochs and at the end."""
    if not args.output_dir:
        return
    names = ["checkpoint-last.pth"]
    if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs:
        names.insert(0, f"checkpoint-{epoch}.pth")
    save_training_state(Path(args.output_dir), names, model, optimizer, scaler, epoch, args, **extra)


def wrap_ddp(model: torch.nn.Module, device: torch.device, args: argparse.Namespace) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``model`` when this is a multi-process run."""
    if not args.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


OPTIMIZER_KERNEL_KEYS = ("fused", "foreach")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """The checkpoint's moments and hyperparameters with this run's kernel choice.

    ``Optimizer.load_state_dict`` takes every group setting from the checkpoint, ``fused`` too, so a
    state saved unfused (or on another device) would silently switch the fused kernel off here.
    """
    kernels = [{key: group[key] for key in OPTIMIZER_KERNEL_KEYS if key in group} for group in optimizer.param_groups]
    groups = [{**saved, **kernel} for saved, kernel in zip(state["param_groups"], kernels)]
    optimizer.load_state_dict({**state, "param_groups": groups})


def resume_training_state(
    args: argparse.Namespace, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> Dict[str, Any]:
    """Continue from ``--resume``, or the newest checkpoint when ``--auto_resume``.

    Sets ``args.start_epoch`` (the epoch in progress after a step checkpoint, the next one after
    an epoch checkpoint) and returns the checkpoint (empty when starting fresh).
    """
    path, checkpoint = find_resume_checkpoint(args)
    if not checkpoint:
        return {}
    mismatch = state_mismatch(unwrap_model(model), checkpoint.get("model", {}))
    if mismatch:
        raise UsageError(
            f"checkpoint {path} does not fit --model {getattr(args, 'model', '?')}: {mismatch}; pass a "
            "checkpoint of this model (for pretrained weights use --finetune)"
        )
    unwrap_model(model).load_state_dict(checkpoint["model"])
    if "optimizer" in checkpoint:
        load_optimizer_state(optimizer, checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        args.start_epoch = checkpoint["epoch"] + (0 if "step" in checkpoint else 1)
    if is_main_process():
        where = f"epoch {args.start_epoch}" + (f" step {checkpoint['step']}" if "step" in checkpoint else "")
        print(f"resumed from {path} at {where}")
    return checkpoint


def epoch_start(loader, epoch: int, args: argparse.Namespace, checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """Point the sampler at ``epoch`` and return ``train_epoch``'s start keywords: part-way
    through when ``checkpoint`` was written mid-way through this epoch."""
    start_step, loss_sum = 0, 0.0
    if "step" in checkpoint and checkpoint["epoch"] == epoch:
        start_step, loss_sum = checkpoint["step"], checkpoint["loss_sum"]
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip_first(start_step * args.batch_size)
    return {"start_step": start_step, "loss_sum": loss_sum}


def step_saver(model, optimizer, scaler, epoch: int, args: argparse.Namespace, **extra: Any) -> Callable[[int, float], None]:
    """``save_step`` for ``train_epoch``: ``checkpoint-last.pth`` with the position in the epoch."""
    def save(step: int, loss_sum: float) -> None:
        if args.output_dir:
            save_training_state(Path(args.output_dir), ["checkpoint-last.pth"], model, optimizer, scaler, epoch,
                                args, step=step, loss_sum=loss_sum, **extra)

    return save


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP and torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------- logging


class SmoothedValue:
    """A running window for progress lines plus the exact average over everything seen."""

    def __init__(self, window: int = 20) -> None:
        self.window: deque = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.total += value * n
        self.count += n

    @property
    def median(self) -> float:
        return float(np.median(self.window)) if self.window else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)


class MetricLogger:
    """Named smoothed values and a progress line; the epoch averages go to ``log.txt``."""

    def __init__(self) -> None:
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)

    def update(self, **values: float) -> None:
        for name, value in values.items():
            self.meters[name].update(float(value))

    def line(self) -> str:
        return "  ".join(f"{name} {meter.median:.4g} ({meter.global_avg:.4g})" for name, meter in self.meters.items())

    def averages(self) -> Dict[str, float]:
        return {name: meter.global_avg for name, meter in self.meters.items()}


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def append_log(output_dir: Optional[str], record: Mapping[str, Any]) -> None:
    """One JSON line per epoch in ``output_dir/log.txt`` (main process only)."""
    if output_dir and is_main_process():
        with open(Path(output_dir) / "log.txt", "a") as handle:
            handle.write(json.dumps(dict(record)) + "\n")


def make_tensorboard_writer(log_dir: Optional[str]):
    """A TensorBoard writer on the main process when ``log_dir`` is set, else None."""
    if not log_dir or not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)


@contextmanager
def training_writer(log_dir: Optional[str]) -> Iterator[Optional[Any]]:
    """The TensorBoard writer of a training run (None off the main process), closed however the run
    ends; a non-finite loss ends the process with exit code 1 and its message, not a traceback."""
    writer = make_tensorboard_writer(log_dir)
    try:
        yield writer
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    finally:
        if writer is not None:
            writer.close()


def check_writable_dir(path: Optional[str], flag: str) -> None:
    """Create ``path`` or fail with a usage error before any work is done."""
    if not path:
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise UsageError(f"{flag} {path} cannot be written ({error.strerror}); choose another directory") from error


class Timer:
    """Seconds since construction, for throughput and ETA."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ----------------------------------------------------------------------------- training steps


def grad_sync(model: torch.nn.Module, update: bool) -> ContextManager:
    """DDP's ``no_sync`` on micro-steps that do not update, so gradients are all-reduced once."""
    if update or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


def clip_or_measure_grad_norm(
    model: torch.nn.Module, clip_grad: Optional[float], measure: bool = True
) -> Optional[torch.Tensor]:
    """The total gradient norm, clipped to ``clip_grad`` when given. Without clipping it is only
    computed, and only when ``measure``: ``clip_grad_norm_(..., inf)`` would still multiply every
    gradient by 1, a second pass over them (17 of 35 ms per step for ViT-B/16 MAE on 2 CPU cores),
    and the norm itself is one more pass that only progress lines read. None when not measured."""
    if clip_grad is not None:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if not measure:
        return None
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    clip_grad: Optional[float], measure_norm: bool = True,
) -> Optional[torch.Tensor]:
    """Unscale, clip (or measure, if ``measure_norm``) the gradient norm, step, clear; returns the
    norm on the device, or None when it was neither needed nor asked for."""
    scaler.unscale_(optimizer)
    grad_norm = clip_or_measure_grad_norm(model, clip_grad, measure_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: the run stops before anything is saved."""


class NonFiniteWatch:
    """Tracks, on the device, the first step that ends a run of ``patience`` non-finite losses.

    Without a grad scaler one bad loss already poisons the weights, so patience is 1. With fp16
    the scaler skips such steps and lowers the scale; only a run of them means the run is lost.
    Reading a loss back every step would stall the host while the GPU drains, so the check stays
    on the device and is read only at logging steps, before step checkpoints and at epoch end.
    """

    def __init__(self, device: torch.device, patience: int = 1) -> None:
        self.patience = patience
        self.streak = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        finite = torch.isfinite(loss.detach())
        self.streak = torch.where(finite, torch.zeros_like(self.streak), self.streak + 1)
        bad_now = (self.streak >= self.patience) & (self.first_bad < 0)
        self.first_bad = torch.where(bad_now, torch.full_like(self.first_bad, step), self.first_bad)

    def raise_if_bad(self, epoch: int, steps_per_epoch: int, args: argparse.Namespace, scaler) -> None:
        step = int(self.first_bad)
        if step >= 0:
            lr = lr_at(epoch + step / steps_per_epoch, args)
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            raise NonFiniteLossError(
                f"loss is not finite at epoch {epoch} step {step} (lr {lr:.3g}, loss scale {scale:g}); "
                "stopping without saving, the last good checkpoint is untouched. Lower --blr, "
                "raise --warmup_epochs or use --amp bf16"
            )


FP16_NONFINITE_PATIENCE = 10  # consecutive skipped fp16 steps before the run is called lost


def max_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest group lr: the schedule's value, which layer decay only scales down."""
    return max(group["lr"] for group in optimizer.param_groups)


def log_progress(
    metrics: MetricLogger,
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    data_time: float,
    timer: Timer,
    step: int,
    steps: int,
    epoch: int,
    start_step: int = 0,
) -> None:
    """A progress line on the main process: the only place the loss is read every N steps.

    Throughput and ETA count the steps this process ran, from ``start_step`` after a resume.
    """
    elapsed = timer.elapsed()
    done = step + 1 - start_step
    images_per_s = batch_size * get_world_size() * done / max(elapsed, 1e-9)
    metrics.update(grad_norm=float(grad_norm), data_time=data_time)
    if is_main_process():
        eta = format_eta(elapsed / done * (steps - step - 1))
        print(
            f"epoch {epoch} [{step + 1}/{steps}]  loss {loss.detach().item():.4f}  "
            f"lr {max_lr(optimizer):.3e}  {metrics.line()}  "
            f"{images_per_s:.1f} img/s  eta {eta}",
            flush=True,
        )


# ----------------------------------------------------------------------------- the epoch loop


def train_epoch(
    model: torch.nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    epoch: int,
    args: argparse.Namespace,
    loss_fn: Callable[[Any], torch.Tensor],
    log_writer: Optional[object] = None,
    start_step: int = 0,
    loss_sum: float = 0.0,
    save_step: Optional[Callable[[int, float], None]] = None,
) -> Dict[str, float]:
    """One epoch of either stage: ``loss_fn(batch)`` gives the loss, this does the rest.

    Per micro-step: RNGs seeded from (seed, rank, epoch, step), lr from the fractional epoch,
    forward under autocast, backward (no DDP all-reduce until the last micro-step), optimizer
    step, and every ``--save_ckpt_steps`` updates ``save_step(steps_done, loss_sum)``. A resumed
    epoch starts at ``start_step`` with the loss sum it had, so it ends as an uninterrupted one.
    """
    model.train()
    steps = len(loader)
    metrics = MetricLogger()
    watch = NonFiniteWatch(device, FP16_NONFINITE_PATIENCE if scaler.is_enabled() else 1)
    loss_total = torch.tensor(loss_sum, dtype=torch.float64, device=device)
    grad_norm = torch.zeros((), device=device)
    timer = Timer()
    data_start = timer.elapsed()
    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(loader, start=start_step):
        data_time = timer.elapsed() - data_start
        seed_everything(args.seed, args.rank, epoch, step)
        update = (step + 1) % args.accum_iter == 0
        if step % args.accum_iter == 0:
            set_learning_rate(optimizer, lr_at(epoch + step / steps, args))
        with grad_sync(model, update):
            with autocast(device, args.amp):
                loss = loss_fn(batch)
            scaler.scale(loss / args.accum_iter).backward()
        if update:
            norm = optimizer_step(unwrap_model(model), optimizer, scaler, args.clip_grad,
                                  measure_norm=norm_is_read(step, steps, args))
            grad_norm = grad_norm if norm is None else norm
        watch.observe(loss, step)
        loss_total += loss.detach()
        if update and save_step is not None and step + 1 < steps and is_step_checkpoint(step, args):
            watch.raise_if_bad(epoch, steps, args, scaler)  # a bad loss never reaches a checkpoint
            save_step(step + 1, float(loss_total))
        if is_logging_step(step, steps, args):
            watch.raise_if_bad(epoch, steps, args, scaler)
            log_progress(metrics, loss, grad_norm, optimizer, args.batch_size, data_time, timer, step, steps, epoch,
                         start_step)
            log_scalars(log_writer, epoch * steps + step, loss, grad_norm, optimizer)
        data_start = timer.elapsed()
    watch.raise_if_bad(epoch, steps, args, scaler)
    mean_loss = float(all_reduce_mean(loss_total / steps))
    return {"loss": mean_loss, "lr": max_lr(optimizer), **metrics.averages()}


def is_logging_step(step: int, steps: int, args: argparse.Namespace) -> bool:
    """Whether micro-step ``step`` of an epoch of ``steps`` prints a progress line."""
    return step % args.print_freq == 0 or step == steps - 1


def norm_is_read(step: int, steps: int, args: argparse.Namespace) -> bool:
    """Whether a progress line shows the gradient norm of the update at micro-step ``step``
    before the next update replaces it; only those updates measure it (unless ``--clip_grad``
    needs it anyway): a pass over every gradient, 1.6% of a ViT-B/16 step on 2 CPU cores."""
    return any(is_logging_step(later, steps, args) for later in range(step, min(step + args.accum_iter, steps)))


def is_step_checkpoint(step: int, args: argparse.Namespace) -> bool:
    """Whether the optimizer update at micro-step ``step`` is one ``--save_ckpt_steps`` asks for."""
    every = getattr(args, "save_ckpt_steps", 0)
    return bool(every) and ((step + 1) // args.accum_iter) % every == 0


def log_scalars(log_writer, global_step: int, loss: torch.Tensor, grad_norm: torch.Tensor, optimizer) -> None:
    """Training curves in TensorBoard (main process only: others have no writer)."""
    if log_writer is None:
        return
    log_writer.add_scalar("train/loss", loss.detach().item(), global_step)
    log_writer.add_scalar("train/lr", max_lr(optimizer), global_step)
    log_writer.add_scalar("train/grad_norm", float(grad_norm), global_step)


def fused_attention_is_faster(device: torch.device, amp: str) -> bool:
    """Everywhere but bf16 on CPU, where torch's CPU flash-attention backward is the slow part of a
    training step: forward and backward of ViT-B/16 MAE's decoder attention take 85 ms fused against
    48 ms on timm's own matmul-softmax path, its encoder's 38 against 28 (batch 8, 2 cores,
    benchmarks/RESULTS.md). In fp32 and on GPUs the fused kernel is the faster one."""
    return not (device.type == "cpu" and amp == "bf16")


def use_fastest_attention(model: torch.nn.Module, device: torch.device, amp: str) -> None:
    """Switch every timm ``Attention`` between ``F.scaled_dot_product_attention`` and timm's
    matmul-softmax path, whichever ``fused_attention_is_faster`` says trains faster here."""
    fused = fused_attention_is_faster(device, amp)
    for module in model.modules():
        if isinstance(module, timm.layers.Attention):
            module.fused_attn = fused


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile(model)`` when asked. The wrapper shares the parameters, so the optimizer and
    checkpoints (through ``unwrap_model``, which strips ``_orig_mod``) see the same tensors."""
    return torch.compile(model) if enabled else model
