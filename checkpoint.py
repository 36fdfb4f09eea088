"""Checkpoints: written atomically, read with ``weights_only``, found again after a crash, and
resumed at the epoch and step they were written.

Every checkpoint is a dict of tensors and plain values: ``model`` (official key names), ``optimizer``,
``scaler``, ``epoch``, ``args``; a step checkpoint adds ``step`` and ``loss_sum``, finetuning adds
``max_accuracy``.
"""
import argparse
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from utils import UsageError, atomic_write, is_main_process, unwrap_model

LAST = "checkpoint-last.pth"
BEST = "checkpoint-best.pth"


@dataclass
class TrainingState:
    """What a checkpoint saves and a resume restores. ``model`` may be wrapped (DDP, compiled);
    its weights are saved and loaded unwrapped."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


@dataclass(frozen=True)
class EpochStart:
    """Where an epoch begins: at step 0, or part-way after a step checkpoint, with the sum of the
    losses its steps so far had, so the epoch's mean comes out as an uninterrupted one's."""

    step: int = 0
    loss_sum: float = 0.0


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
    """``torch.save`` through ``utils.atomic_write``: a kill leaves the old file intact."""
    with atomic_write(path) as tmp:
        torch.save(dict(payload), tmp)


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


def state_mismatch(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """The missing, unexpected and wrongly shaped keys of ``state`` for ``model``; '' if it fits."""
    own = model.state_dict()
    shapes = [f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
              for key in sorted(own.keys() & state.keys()) if tuple(state[key].shape) != tuple(own[key].shape)]
    parts = {"missing": sorted(own.keys() - state.keys()), "unexpected": sorted(state.keys() - own.keys()),
             "shapes (checkpoint vs model)": shapes}
    return "; ".join(f"{name}: {', '.join(keys[:8])}" + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
                     for name, keys in parts.items() if keys)


# ----------------------------------------------------------------------------- writing


def save_training_state(
    state: TrainingState, output_dir: Path, names: Iterable[str], *, epoch: int, args: argparse.Namespace,
    **extra: Any,
) -> None:
    """Write one checkpoint under each of ``names`` (main process only)."""
    if not is_main_process():
        return
    payload = {
        "model": unwrap_model(state.model).state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "epoch": epoch,
        "args": plain_args(args),
        **extra,
    }
    for name in names:
        save_atomic(payload, Path(output_dir) / name)


def save_epoch(state: TrainingState, *, epoch: int, args: argparse.Namespace, **extra: Any) -> None:
    """``checkpoint-last.pth`` every epoch; ``checkpoint-{epoch}.pth`` every ``--save_ckpt_freq``
    epochs and at the end."""
    if not args.output_dir:
        return
    names = [LAST]
    if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs:
        names.insert(0, f"checkpoint-{epoch}.pth")
    save_training_state(state, Path(args.output_dir), names, epoch=epoch, args=args, **extra)


def step_saver(
    state: TrainingState, *, epoch: int, args: argparse.Namespace, **extra: Any
) -> Callable[[int, float], None]:
    """``save_step`` for ``engine.train_epoch``: ``checkpoint-last.pth`` with the position in the epoch."""
    def save(step: int, loss_sum: float) -> None:
        if args.output_dir:
            save_training_state(state, Path(args.output_dir), [LAST], epoch=epoch, args=args,
                                step=step, loss_sum=loss_sum, **extra)

    return save


# ----------------------------------------------------------------------------- resuming


def checkpoint_epoch(path: Path) -> int:
    """The epoch number in ``checkpoint-{epoch}.pth``; -1 for other names."""
    stem = path.stem.rsplit("-", 1)[-1]
    return int(stem) if stem.isdigit() else -1


def resume_candidates(output_dir: Path) -> List[Path]:
    """``checkpoint-last.pth``, then the numbered checkpoints, newest first."""
    output_dir = Path(output_dir)
    numbered = [path for path in output_dir.glob("checkpoint-*.pth") if checkpoint_epoch(path) >= 0]
    last = [output_dir / LAST] if (output_dir / LAST).is_file() else []
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


OPTIMIZER_KERNEL_KEYS = ("fused", "foreach")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """The checkpoint's moments and hyperparameters with this run's kernel choice.

    ``Optimizer.load_state_dict`` takes every group setting from the checkpoint, ``fused`` too, so a
    state saved unfused (or on another device) would silently switch the fused kernel off here.
    """
    kernels = [{key: group[key] for key in OPTIMIZER_KERNEL_KEYS if key in group} for group in optimizer.param_groups]
    groups = [{**saved, **kernel} for saved, kernel in zip(state["param_groups"], kernels)]
    optimizer.load_state_dict({**state, "param_groups": groups})


def resume_training_state(state: TrainingState, args: argparse.Namespace) -> Dict[str, Any]:
    """Continue from ``--resume``, or the newest checkpoint when ``--auto_resume``.

    Sets ``args.start_epoch`` (the epoch in progress after a step checkpoint, the next one after
    an epoch checkpoint) and returns the checkpoint (empty when starting fresh).
    """
    path, checkpoint = find_resume_checkpoint(args)
    if not checkpoint:
        return {}
    model = unwrap_model(state.model)
    mismatch = state_mismatch(model, checkpoint.get("model", {}))
    if mismatch:
        raise UsageError(
            f"checkpoint {path} does not fit --model {getattr(args, 'model', '?')}: {mismatch}; pass a "
            "checkpoint of this model (for pretrained weights use --finetune)"
        )
    model.load_state_dict(checkpoint["model"])
    if "optimizer" in checkpoint:
        load_optimizer_state(state.optimizer, checkpoint["optimizer"])
        state.scaler.load_state_dict(checkpoint["scaler"])
        args.start_epoch = checkpoint["epoch"] + (0 if "step" in checkpoint else 1)
    if is_main_process():
        where = f"epoch {args.start_epoch}" + (f" step {checkpoint['step']}" if "step" in checkpoint else "")
        print(f"resumed from {path} at {where}")
    return checkpoint


def epoch_start(checkpoint: Mapping[str, Any], epoch: int) -> EpochStart:
    """Where ``epoch`` begins: part-way through when ``checkpoint`` was written mid-way through it."""
    if "step" in checkpoint and checkpoint["epoch"] == epoch:
        return EpochStart(step=checkpoint["step"], loss_sum=checkpoint["loss_sum"])
    return EpochStart()
