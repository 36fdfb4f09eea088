"""Choosing the checkpoint a run continues from and loading it: rank 0 chooses (``--resume``, or the
newest one that reads with ``--auto_resume``; only a damaged file sends it to an older one), every
rank reads the same one, all continue or all stop; then the weights, the optimizer state and where
the run goes on, with a line when the batch or the order of the epoch changed."""
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from modeling_finetune import state_mismatch
from training import sharded_checkpoint
from training.checkpoint import LAST, TrainingState, sharded_name
from training.checkpoint_files import CorruptCheckpointError, read_checkpoint
from training.optimizer_state import load_optimizer_state, optimizer_kernels
from training.settings import Settings
from training.wrapping import is_sharded, unwrap_model
from utils import RunFailure, UsageError, broadcast_from_main, is_main_process, raise_on_all_ranks


ORDER_FLAGS = ("seed", "data_path", "num_samples", "shuffle_window")  # what the order of an epoch follows


@dataclass(frozen=True)
class Resuming(Settings):
    """Which checkpoint a run continues from (``--resume``, else with ``--auto_resume`` the newest in
    ``output_dir`` of the ``--fsdp`` kind), the epoch a fresh run starts at, the ``--model`` it must
    fit, and what the lines on a changed batch or epoch order compare with the checkpoint's run:
    the batch's shape and lr, and the values of ``ORDER_FLAGS`` (``order``)."""

    model: str
    batch_size: int
    accum_iter: int
    world_size: int
    eff_batch_size: int
    lr: float
    blr: float
    resume: str = ""
    auto_resume: bool = True
    output_dir: Optional[str] = None
    fsdp: bool = False
    start_epoch: int = 0
    order: Mapping[str, Any] = field(default_factory=dict)


def checkpoint_epoch(path: Path) -> int:
    """The epoch number in ``checkpoint-{epoch}.pth`` or a ``checkpoint-{epoch}`` folder; -1 for
    other names."""
    stem = sharded_name(Path(path).name).rsplit("-", 1)[-1]
    return int(stem) if stem.isdigit() else -1


def resume_candidates(output_dir: Path, sharded: bool) -> List[Path]:
    """``checkpoint-last``, then the numbered checkpoints, newest first: files, or with ``sharded``
    the folders ``--fsdp`` writes."""
    output_dir = Path(output_dir)
    kind = Path.is_dir if sharded else Path.is_file
    last = output_dir / (sharded_name(LAST) if sharded else LAST)
    numbered = [path for path in output_dir.glob("checkpoint-*") if checkpoint_epoch(path) >= 0 and kind(path)]
    return [last] * kind(last) + sorted(numbered, key=checkpoint_epoch, reverse=True)


def find_resume_checkpoint(resuming: Resuming) -> Tuple[Optional[Path], Dict[str, Any]]:
    """``--resume``'s checkpoint, or with ``--auto_resume`` the newest readable one in output_dir,
    chosen by rank 0 and read by every rank (a collective): all continue from the same one, or all
    stop with the same error."""
    choice, error = None, None
    if is_main_process():
        try:
            choice = choose_resume_checkpoint(resuming)
        except Exception as raised:  # noqa: BLE001 - every rank must hear of it, whatever it is
            error = raised
    raise_on_all_ranks(error)
    choice = broadcast_from_main(None if choice is None else str(choice))
    if choice is None:
        return None, {}
    checkpoint, error = {}, None
    try:
        checkpoint = read_checkpoint(Path(choice))
    except CorruptCheckpointError as raised:
        error = CorruptCheckpointError(f"{raised}, though rank 0 read it: do the ranks see the same file?")
    except Exception as raised:  # noqa: BLE001
        error = raised if isinstance(raised, UsageError) else RunFailure(reading_failure(Path(choice), raised))
    raise_on_all_ranks(error)
    return Path(choice), checkpoint


def choose_resume_checkpoint(resuming: Resuming) -> Optional[Path]:
    """Rank 0's choice: ``--resume``, or the newest checkpoint of this run's kind that reads (a
    damaged one is reported and the next older one tried; any other error stops the run)."""
    if resuming.resume:
        read_checkpoint(Path(resuming.resume))
        return Path(resuming.resume)
    if not (resuming.auto_resume and resuming.output_dir):
        return None
    check_same_kind(Path(resuming.output_dir), sharded=resuming.fsdp)
    for path in resume_candidates(Path(resuming.output_dir), sharded=resuming.fsdp):
        try:
            read_checkpoint(path)
            return path
        except CorruptCheckpointError as error:
            print(f"warning: {error}; trying the next older checkpoint", file=sys.stderr, flush=True)
        except UsageError:
            raise
        except Exception as error:
            raise RunFailure(reading_failure(path, error)) from error
    return None


def reading_failure(path: Path, error: BaseException) -> str:
    """Why a checkpoint that is not damaged could not be read, and that nothing else was tried."""
    cause = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}".rstrip(": ")
    return (f"checkpoint {path} could not be read ({cause}); the file does not look damaged, so no older "
            "checkpoint was tried: fix the cause and relaunch")


def check_same_kind(output_dir: Path, *, sharded: bool) -> None:
    """Refuse to start afresh, or from an older checkpoint, where the newest checkpoint of the folder
    was written with the other ``--fsdp`` setting."""
    own, other = resume_candidates(output_dir, sharded), resume_candidates(output_dir, not sharded)
    if not other or own and own[0].stat().st_mtime >= other[0].stat().st_mtime:
        return
    written = "with --fsdp (a folder of shards)" if not sharded else "without --fsdp (one file)"
    relaunch = "with --fsdp" if not sharded else "without --fsdp"
    raise UsageError(f"the newest checkpoint in {output_dir}, {other[0].name}, was written {written}: relaunch "
                     f"{relaunch} to resume it, or pass another --output_dir to start afresh")


def load_weights_and_optimizer(state: TrainingState, path: Path, checkpoint: Mapping[str, Any], *,
                               model_name: str) -> None:
    """The checkpoint's model and optimizer state into ``state``, after checking that it fits (a
    collective for a sharded folder, which every rank reads its shards of)."""
    model = unwrap_model(state.model)
    if sharded_checkpoint.is_sharded_checkpoint(path):
        shapes = {key: torch.empty(size, device="meta") for key, size in sharded_checkpoint.model_shapes(path).items()}
        mismatch = state_mismatch(model, shapes)
    else:
        mismatch = state_mismatch(model, checkpoint.get("model", {}))
    if mismatch:
        raise UsageError(
            f"checkpoint {path} does not fit --model {model_name}: {mismatch}; pass a "
            "checkpoint of this model (for pretrained weights use --finetune)"
        )
    if sharded_checkpoint.is_sharded_checkpoint(path):
        kernels = optimizer_kernels(state.optimizer)
        sharded_checkpoint.load(state.model, state.optimizer, path)
        for group, kernel in zip(state.optimizer.param_groups, kernels):
            group.update(kernel)
        return
    model.load_state_dict(checkpoint["model"])
    if "optimizer" in checkpoint:
        load_optimizer_state(state.optimizer, checkpoint["optimizer"])


@dataclass(frozen=True)
class Resume:
    """What a run continues from: the checkpoint (empty when it starts afresh) and the first epoch
    to train, the one in progress after a step checkpoint, the next one after an epoch's."""

    checkpoint: Mapping[str, Any]
    epoch: int


def resume_training_state(state: TrainingState, resuming: Resuming) -> Resume:
    """Continue from ``--resume``, or the newest checkpoint when ``--auto_resume``: its weights and
    optimizer state into ``state``, and where the run continues (``--start_epoch`` when fresh). A
    collective: call it on every rank."""
    path, checkpoint = find_resume_checkpoint(resuming)
    if not checkpoint:
        return Resume({}, resuming.start_epoch)
    folder = sharded_checkpoint.is_sharded_checkpoint(path)
    if folder and not is_sharded(state.model):
        raise UsageError(f"checkpoint {path} is a sharded folder: resume it with --fsdp, or make one file of its "
                         "weights with consolidate_checkpoint.py")
    if is_sharded(state.model) and not folder:
        raise UsageError(f"checkpoint {path} is one file, and --fsdp resumes the folders it writes: resume it "
                         "without --fsdp")
    load_weights_and_optimizer(state, path, checkpoint, model_name=resuming.model)
    epoch = resuming.start_epoch
    if "optimizer" in checkpoint or folder:
        state.scaler.load_state_dict(checkpoint["scaler"])
        epoch = checkpoint["epoch"] + (0 if "step" in checkpoint else 1)
    if is_main_process():
        where = f"epoch {epoch}" + (f" step {checkpoint['step']}" if "step" in checkpoint else "")
        print(f"resumed from {path} at {where}")
        for change in (batch_change(checkpoint.get("args", {}), resuming),
                       order_change(checkpoint, resuming.order)):
            if change:
                print(change)
    return Resume(checkpoint, epoch)


def order_change(checkpoint: Mapping[str, Any], order: Mapping[str, Any]) -> str:
    """One line when a checkpoint written mid-epoch was made under another order of the epoch
    (``order``: this run's values of ``ORDER_FLAGS``): the positions it counts as done then name
    other samples, so that epoch is no longer exact."""
    written_by = checkpoint.get("args", {})
    changed = [flag for flag in ORDER_FLAGS
               if flag in written_by and written_by[flag] != order.get(flag, written_by[flag])]
    if "step" not in checkpoint or not changed:
        return ""
    flags = ", ".join(f"--{flag} {written_by[flag]} then, {order.get(flag)} now" for flag in changed)
    return (f"warning: the order of epoch {checkpoint['epoch']} changed ({flags}): the rest of it follows the new "
            "order, so some of its samples may be trained twice and others not at all; later epochs are exact")


def batch_change(written_by: Mapping[str, Any], resuming: Resuming) -> str:
    """One line when the effective batch differs from the checkpoint's run, saying how the lr follows."""
    before, now = written_by.get("eff_batch_size"), resuming.eff_batch_size
    if before is None or before == now:
        return ""
    processes = f"{resuming.world_size} process" + ("es" if resuming.world_size > 1 else "")
    shape = f"{processes} x {resuming.batch_size} x {resuming.accum_iter} accumulation steps"
    if written_by.get("lr") == resuming.lr:
        follows = f"lr {resuming.lr:.3e} stays as --lr gives it"
    else:
        follows = f"lr = blr {resuming.blr:g} x {now} / 256 = {resuming.lr:.3e} (was {written_by.get('lr', float('nan')):.3e})"
    return f"effective batch {before} in the checkpoint, {now} now ({shape}): {follows}"
