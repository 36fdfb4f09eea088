"""Writing checkpoints: ``checkpoint-last.pth`` every epoch and at step checkpoints, the numbered and
best ones, each atomically, whose failure stops every rank.

Every checkpoint is a dict of tensors and plain values: ``model`` (official key names), ``optimizer``,
``scaler``, ``epoch``, ``args``; a step checkpoint adds where it stopped in the epoch
(``training.epoch_position``), finetuning adds ``max_accuracy``. With ``--fsdp`` the same is a folder
of shards (``sharded_checkpoint``), and the run ends with a consolidated file of the model,
``checkpoint-{epoch}-consolidated.pth``. Reading them: ``training.checkpoint_files``,
``training.weight_files``; resuming: ``training.resume``.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional

import torch

from training import sharded_checkpoint
from training.checkpoint_files import save_files
from training.epoch_position import EpochStart
from training.settings import Settings
from training.wrapping import is_sharded, unwrap_model
from utils import is_main_process, raise_on_all_ranks

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
class Checkpointing(Settings):
    """Where checkpoints go and which are kept; ``record``: the run's settings as plain values, the
    flat ``args`` every checkpoint stores (``training.config.plain_record``), which a resume reads;
    ``config_yaml``: the same as ``OUTPUT_DIR/config.yaml`` (``training.config_file``)."""

    output_dir: Optional[str]
    save_ckpt_freq: int
    epochs: int
    record: Mapping[str, Any] = field(default_factory=dict, repr=False)
    config_yaml: str = field(default="", repr=False)


def save_training_state(
    state: TrainingState, output_dir: Path, names: List[str], *, epoch: int, record: Mapping[str, Any],
    **extra: Any,
) -> Path:
    """Write one checkpoint under each of ``names`` (a file, written by rank 0; for a sharded model
    a folder, by every rank) and return the first one's path. Call it on every rank."""
    if is_sharded(state.model):
        meta = {"epoch": epoch, "args": dict(record), "scaler": state.scaler.state_dict(), **extra}
        folders = [sharded_name(name) for name in names]
        sharded_checkpoint.save(state.model, state.optimizer, Path(output_dir), folders, meta)
        return Path(output_dir) / folders[0]
    error = None
    if is_main_process():
        payload = {
            "model": unwrap_model(state.model).state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scaler": state.scaler.state_dict(),
            "epoch": epoch,
            "args": dict(record),
            **extra,
        }
        error = save_files(payload, [Path(output_dir) / name for name in names])
    raise_on_all_ranks(error)  # rank 0's failure stops every rank, at once and with its cause
    return Path(output_dir) / names[0]


def sharded_name(name: str) -> str:
    """A sharded checkpoint's folder: the file's name without ``.pth``."""
    return name.removesuffix(".pth")


def save_consolidated(state: TrainingState, *, epoch: int, output_dir: str, record: Mapping[str, Any]) -> Path:
    """The sharded model whole in one file of the usual format (``model``, ``epoch``, ``args``),
    for finetuning, k-NN, the probe, pictures and other tools (collective; rank 0 writes)."""
    model = sharded_checkpoint.full_model_state(state.model)
    path = Path(output_dir) / consolidated_name(epoch)
    error = None
    if is_main_process():
        error = save_files({"model": model, "epoch": epoch, "args": dict(record)}, [path])
        if error is None:
            print(f"wrote the whole model to {path}", flush=True)
    raise_on_all_ranks(error)
    return path


def consolidated_name(epoch: int, step: Optional[int] = None) -> str:
    """Not a ``checkpoint-{epoch}.pth``: it holds no optimizer, so a resume must not pick it."""
    return f"checkpoint-{epoch}" + (f"-step{step}" if step is not None else "") + "-consolidated.pth"


def save_epoch(state: TrainingState, *, epoch: int, checkpointing: Checkpointing, **extra: Any) -> None:
    """``checkpoint-last.pth`` every epoch; ``checkpoint-{epoch}.pth`` every ``--save_ckpt_freq``
    epochs and at the end. A collective: call it on every rank."""
    output_dir = checkpointing.output_dir
    if not output_dir:
        return
    names = [LAST]
    if (epoch + 1) % checkpointing.save_ckpt_freq == 0 or epoch + 1 == checkpointing.epochs:
        names.insert(0, f"checkpoint-{epoch}.pth")
    save_training_state(state, Path(output_dir), names, epoch=epoch, record=checkpointing.record, **extra)
    if epoch + 1 == checkpointing.epochs and is_sharded(state.model):
        save_consolidated(state, epoch=epoch, output_dir=output_dir, record=checkpointing.record)


StepSaver = Callable[[EpochStart, int], Optional[Path]]  # (position, micro-steps done) -> the file


def step_saver(state: TrainingState, *, epoch: int, checkpointing: Checkpointing, **extra: Any) -> StepSaver:
    """``save_step`` for ``training.loop.train_epoch``: ``checkpoint-last.pth`` with the position in the
    epoch; returns its path (None without ``--output_dir``). Called on every rank, written by rank 0."""
    def save(position: EpochStart, step: int) -> Optional[Path]:
        if not checkpointing.output_dir:
            return None
        return save_training_state(state, Path(checkpointing.output_dir), [LAST], epoch=epoch,
                                   record=checkpointing.record, **position.to_checkpoint(step), **extra)

    return save
