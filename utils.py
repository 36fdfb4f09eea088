"""Shared helpers of the run_* scripts: distribution, precision, schedule, checkpoints, logs."""
import argparse
import datetime
import json
import math
import os
import random
import subprocess
import sys
import time
from collections import defaultdict, deque
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterable, Mapping, Optional

import numpy as np
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
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                       help="mixed precision (default: bf16 on GPUs that support it, none on CPU)")
    group.add_argument("--seed", default=0, type=int)
    group.add_argument("--resume", default="", help="checkpoint to continue from")
    group.add_argument("--auto_resume", action=argparse.BooleanOptionalAction, default=True,
                       help="continue from the newest checkpoint in output_dir")
    group.add_argument("--start_epoch", default=0, type=int)
    group.add_argument("--save_ckpt_freq", default=20, type=int, help="keep checkpoint-{epoch}.pth every N epochs")
    group.add_argument("--print_freq", default=20, type=int, help="progress line every N steps")
    group.add_argument("--local_rank", "--local-rank", default=None, type=int,
                       help="set by torch.distributed.launch; the environment wins")


def validate_common_args(args: argparse.Namespace) -> None:
    """Checks both stages need before anything is built or written."""
    for flag in ("batch_size", "accum_iter", "epochs", "save_ckpt_freq", "print_freq"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
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
    if args.distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=args.rank, world_size=args.world_size)
        dist.barrier()
    return device


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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load tensors and plain values only; refuse anything that would run code."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the pickle module raises several types for foreign objects
        raise UsageError(
            f"checkpoint {path} cannot be loaded with weights_only=True ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); only tensors and plain values are accepted"
        ) from error


def checkpoint_epoch(path: Path) -> int:
    """The epoch number in ``checkpoint-{epoch}.pth``; -1 for other names."""
    stem = path.stem.rsplit("-", 1)[-1]
    return int(stem) if stem.isdigit() else -1


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """``checkpoint-last.pth`` if present, else the highest-numbered ``checkpoint-N.pth``."""
    output_dir = Path(output_dir)
    last = output_dir / "checkpoint-last.pth"
    if last.is_file():
        return last
    numbered = sorted(output_dir.glob("checkpoint-*.pth"), key=checkpoint_epoch)
    numbered = [path for path in numbered if checkpoint_epoch(path) >= 0]
    return numbered[-1] if numbered else None


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


def resume_training_state(
    args: argparse.Namespace, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> Dict[str, Any]:
    """Continue from ``--resume``, or the newest checkpoint when ``--auto_resume``.

    Sets ``args.start_epoch`` and returns the checkpoint (empty when starting fresh).
    """
    path = args.resume or (latest_checkpoint(args.output_dir) if args.auto_resume and args.output_dir else None)
    if not path:
        return {}
    checkpoint = load_checkpoint(Path(path))
    try:
        unwrap_model(model).load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError) as error:
        raise UsageError(
            f"checkpoint {path} does not fit --model {getattr(args, 'model', '?')}: "
            f"{' '.join(str(error).split())[:400]}; pass a checkpoint of this model (for pretrained "
            "weights use --finetune)"
        ) from error
    if "optimizer" in checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        args.start_epoch = checkpoint["epoch"] + 1
    if is_main_process():
        print(f"resumed from {path} at epoch {args.start_epoch}")
    return checkpoint


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


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    clip_grad: Optional[float],
) -> torch.Tensor:
    """Unscale, clip (or only measure) the gradient norm, step, clear; returns the norm on device."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad or math.inf)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: the run stops before anything is saved."""


class NonFiniteWatch:
    """Remembers, on the device, the first step whose loss was not finite.

    Reading a loss back every step would stall the host while the GPU drains; this keeps the
    check on the device and reads it only at logging steps and at the end of the epoch.
    """

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad_now = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
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
) -> None:
    """A progress line on the main process: the only place the loss is read every N steps."""
    elapsed = timer.elapsed()
    images_per_s = batch_size * get_world_size() * (step + 1) / max(elapsed, 1e-9)
    metrics.update(grad_norm=float(grad_norm), data_time=data_time)
    loss = loss.detach()
    if is_main_process():
        eta = format_eta(elapsed / (step + 1) * (steps - step - 1))
        print(
            f"epoch {epoch} [{step + 1}/{steps}]  loss {loss.item():.4f}  "
            f"lr {max_lr(optimizer):.3e}  {metrics.line()}  "
            f"{images_per_s:.1f} img/s  eta {eta}",
            flush=True,
        )
