"""Checkpoints: written atomically, read with ``weights_only``, found again after a crash, and
resumed at the epoch and step they were written.

Every checkpoint is a dict of tensors and plain values: ``model`` (official key names), ``optimizer``,
``scaler``, ``epoch``, ``args``; a step checkpoint adds where it stopped in the epoch (``step``,
``samples_done``, ``samples_per_epoch``, ``loss_sums``, ``losses_counted``), finetuning adds
``max_accuracy``. With ``--fsdp`` the same is a folder of shards (``sharded_checkpoint``), and the
run ends with a consolidated file of the model, ``checkpoint-{epoch}-consolidated.pth``.
"""
import argparse
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from training import hf_checkpoint
from training import sharded_checkpoint
from modeling_finetune import is_decoder_key, unwrap_state_dict
from training.wrapping import is_sharded, unwrap_model
from utils import RunFailure, UsageError, atomic_write, broadcast_from_main, is_main_process, raise_on_all_ranks

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
    """Where an epoch begins: at its start, or part-way after a step checkpoint, possibly written
    by a run on another number of processes.

    Positions count samples of the epoch's global order (``datasets.EpochSampler``), which does
    not depend on the number of processes; the loss sums let the epoch's mean loss come out as an
    uninterrupted run's.
    """

    samples_done: int = 0  # positions of the epoch's global order trained on, over all ranks
    samples_per_epoch: Optional[int] = None  # of the run that wrote it; None: this run's
    loss_sums: Tuple[float, ...] = ()  # each rank's sum of its micro-batch losses so far
    losses_counted: int = 0  # micro-batch losses in those sums, over all ranks

    def loss_sum_of(self, rank: int, world_size: int) -> float:
        """This rank's starting sum: its own at the same world size (so the sums add up in the same
        order as an uninterrupted run's), else all of them on rank 0."""
        if len(self.loss_sums) == world_size:
            return self.loss_sums[rank]
        return sum(self.loss_sums) if rank == 0 else 0.0

    def to_checkpoint(self, step: int) -> Dict[str, Any]:
        """The keys a step checkpoint stores; ``step`` is the micro-steps done, for messages."""
        return {"step": step, "samples_done": self.samples_done, "samples_per_epoch": self.samples_per_epoch,
                "loss_sums": list(self.loss_sums), "losses_counted": self.losses_counted}


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
    """``torch.save`` through ``utils.atomic_write``: a kill leaves the old file intact, and so
    does a write that fails (a full disk, a quota, a permission), which is a ``RunFailure`` naming
    the file and the cause, with no temporary file left behind."""
    path = Path(path)
    try:
        with atomic_write(path) as tmp, open(tmp, "wb") as handle:  # a file object: torch passes on its OSError
            torch.save(dict(payload), handle)
    except (OSError, RuntimeError) as error:
        cause = os_error_in(error)  # torch's zip writer may raise its own error while handling the OSError
        if cause is None:
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise RunFailure(f"could not write checkpoint {path}: {cause.strerror or cause}; {kept}") from error


def os_error_in(error: BaseException) -> Optional[OSError]:
    """The ``OSError`` that ``error`` is or was raised while handling, if any."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


class CorruptCheckpointError(UsageError):
    """A checkpoint file that is truncated or damaged (a crash mid-copy, a full disk)."""


# what torch's zip reader says of a truncated or damaged file; anything else (a MemoryError, an I/O
# error of a network file system) says nothing about the file and must not send a resume elsewhere
DAMAGE_MARKERS = ("PytorchStreamReader failed", "zip archive", "unexpected EOF", "file too short")
LEGACY_FORMAT = "mmap can only be used with files saved with"


def is_damage(error: BaseException) -> bool:
    """Whether ``error``, raised while reading a checkpoint, means the file itself is damaged."""
    if isinstance(error, (EOFError, zipfile.BadZipFile, sharded_checkpoint.IncompleteCheckpointError)):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in DAMAGE_MARKERS)


def refused(path: Path, error: BaseException) -> UsageError:
    """The one message for a checkpoint whose pickle would run code (``weights_only`` refused it)."""
    return UsageError(
        f"checkpoint {path} holds Python objects that would run code when unpickled "
        f"({' '.join(str(error).split())[:200]}); refused: only tensors and plain values are accepted"
    )


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load tensors and plain values only, memory-mapped (a rank's host memory holds only what it
    copies out); refuse anything that would run code. A damaged file is a
    ``CorruptCheckpointError``; other errors (memory, I/O) propagate as they are."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; check the path")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if LEGACY_FORMAT not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # torch's pre-1.6 format
    except pickle.UnpicklingError as error:  # weights_only refused a global: its code never ran
        raise refused(path, error) from error
    except Exception as error:
        if not is_damage(error):
            raise
        raise CorruptCheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        ) from error


def read_weights(path: Path) -> Dict[str, Any]:
    """Any checkpoint's model weights (``model``) and ``args``: our or an official MAE or timm
    file, a sharded folder (made whole here), or a Hugging Face folder or weight file (our keys)."""
    path = Path(path)
    if hf_checkpoint.hf_folder(path):
        try:
            return hf_checkpoint.read_hf(path)
        except pickle.UnpicklingError as error:  # a pytorch_model.bin whose pickle would run code
            raise refused(path, error) from error
        except (KeyError, ValueError, OSError) as error:
            raise UsageError(f"{path} is no ViTMAE checkpoint we can read: {error}") from error
    if path.is_dir():
        meta = read_checkpoint(path)
        return {"model": sharded_checkpoint.read_model_state(path), "epoch": meta["epoch"], "args": meta["args"]}
    return load_checkpoint(path)


def read_args(path: Path) -> Dict[str, Any]:
    """A checkpoint's ``args`` without reading its tensors (a file is memory-mapped); {} when it
    has none or cannot be read, which the full load then reports."""
    path = Path(path)
    try:
        if hf_checkpoint.hf_folder(path):
            return hf_checkpoint.read_hf_args(path)
        checkpoint = read_checkpoint(path) if path.is_dir() else torch.load(
            path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an older file format, a damaged file, or a refused one: the real load says which
        return {}
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    return args if isinstance(args, dict) else {}


FIXED_TABLES = ("pos_embed", "decoder_pos_embed")  # sine-cosine: the model's own fit any input size


def load_mae_weights(model: torch.nn.Module, checkpoint: Mapping[str, Any], *, source: str,
                     decoder_required: bool) -> List[str]:
    """A pretraining checkpoint's weights (whatever ``read_weights`` reads) into a
    ``PretrainVisionTransformer``, strictly; its fixed position tables stay the model's own. Without
    ``decoder_required`` an encoder-only checkpoint (MAE's released ones) leaves the decoder as
    initialized. Returns the keys left as they were."""
    own = model.state_dict()
    state = {**unwrap_state_dict(checkpoint), **{name: own[name] for name in FIXED_TABLES}}
    kept = [] if decoder_required else [key for key in own if key not in state and is_decoder_key(key)]
    state.update({key: own[key] for key in kept})
    mismatch = state_mismatch(model, state)
    if mismatch:
        hint = "is --model the architecture it was pretrained with?"
        if "decoder_pred.weight" not in state:
            hint = "it has no decoder (an encoder-only checkpoint cannot draw reconstructions)"
        raise UsageError(f"{source} does not fit the model: {mismatch}; {hint}")
    model.load_state_dict(state)
    return kept


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
    state: TrainingState, output_dir: Path, names: List[str], *, epoch: int, args: argparse.Namespace,
    **extra: Any,
) -> Path:
    """Write one checkpoint under each of ``names`` (a file, written by rank 0; for a sharded model
    a folder, by every rank) and return the first one's path. Call it on every rank."""
    if is_sharded(state.model):
        meta = {"epoch": epoch, "args": plain_args(args), "scaler": state.scaler.state_dict(), **extra}
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
            "args": plain_args(args),
            **extra,
        }
        error = save_files(payload, [Path(output_dir) / name for name in names])
    raise_on_all_ranks(error)  # rank 0's failure stops every rank, at once and with its cause
    return Path(output_dir) / names[0]


def save_files(payload: Mapping[str, Any], paths: List[Path]) -> Optional[RunFailure]:
    """``save_atomic`` to each of ``paths``; the failure, if one happened, to hand to the other ranks."""
    try:
        for path in paths:
            save_atomic(payload, path)
    except RunFailure as error:
        return error
    return None


def sharded_name(name: str) -> str:
    """A sharded checkpoint's folder: the file's name without ``.pth``."""
    return name.removesuffix(".pth")


def save_consolidated(state: TrainingState, *, epoch: int, args: argparse.Namespace) -> Optional[Path]:
    """The sharded model whole in one file of the usual format (``model``, ``epoch``, ``args``),
    for finetuning, k-NN, the probe, pictures and other tools (collective; rank 0 writes)."""
    model = sharded_checkpoint.full_model_state(state.model)
    path = Path(args.output_dir) / consolidated_name(epoch)
    error = None
    if is_main_process():
        error = save_files({"model": model, "epoch": epoch, "args": plain_args(args)}, [path])
        if error is None:
            print(f"wrote the whole model to {path}", flush=True)
    raise_on_all_ranks(error)
    return path


def consolidated_name(epoch: int, step: Optional[int] = None) -> str:
    """Not a ``checkpoint-{epoch}.pth``: it holds no optimizer, so a resume must not pick it."""
    return f"checkpoint-{epoch}" + (f"-step{step}" if step is not None else "") + "-consolidated.pth"


def save_epoch(state: TrainingState, *, epoch: int, args: argparse.Namespace, **extra: Any) -> None:
    """``checkpoint-last.pth`` every epoch; ``checkpoint-{epoch}.pth`` every ``--save_ckpt_freq``
    epochs and at the end. A collective: call it on every rank."""
    if not args.output_dir:
        return
    names = [LAST]
    if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs:
        names.insert(0, f"checkpoint-{epoch}.pth")
    save_training_state(state, Path(args.output_dir), names, epoch=epoch, args=args, **extra)
    if epoch + 1 == args.epochs and is_sharded(state.model):
        save_consolidated(state, epoch=epoch, args=args)


StepSaver = Callable[[EpochStart, int], Optional[Path]]  # (position, micro-steps done) -> the file


def step_saver(state: TrainingState, *, epoch: int, args: argparse.Namespace, **extra: Any) -> StepSaver:
    """``save_step`` for ``training.loop.train_epoch``: ``checkpoint-last.pth`` with the position in the
    epoch; returns its path (None without ``--output_dir``). Called on every rank, written by rank 0."""
    def save(position: EpochStart, step: int) -> Optional[Path]:
        if not args.output_dir:
            return None
        return save_training_state(state, Path(args.output_dir), [LAST], epoch=epoch, args=args,
                                   **position.to_checkpoint(step), **extra)

    return save


# ----------------------------------------------------------------------------- resuming


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


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """A file's whole checkpoint (memory-mapped), or a sharded folder's plain values (its tensors
    are loaded into the model later, by every rank): checked complete either way."""
    if not sharded_checkpoint.is_sharded_checkpoint(path):
        return load_checkpoint(path)
    try:
        sharded_checkpoint.check_complete(path)
        return sharded_checkpoint.read_meta(path)
    except sharded_checkpoint.UnsafeMetadataError as error:
        raise refused(path, error) from error
    except Exception as error:
        if not (is_damage(error) or isinstance(error, (FileNotFoundError, pickle.UnpicklingError))):
            raise
        raise CorruptCheckpointError(f"checkpoint {path} is incomplete or corrupt ({error})") from error


def find_resume_checkpoint(args: argparse.Namespace) -> Tuple[Optional[Path], Dict[str, Any]]:
    """``--resume``'s checkpoint, or with ``--auto_resume`` the newest readable one in output_dir,
    chosen by rank 0 and read by every rank (a collective): all continue from the same one, or all
    stop with the same error."""
    choice, error = None, None
    if is_main_process():
        try:
            choice = choose_resume_checkpoint(args)
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


def choose_resume_checkpoint(args: argparse.Namespace) -> Optional[Path]:
    """Rank 0's choice: ``--resume``, or the newest checkpoint of this run's kind that reads (a
    damaged one is reported and the next older one tried; any other error stops the run)."""
    if args.resume:
        read_checkpoint(Path(args.resume))
        return Path(args.resume)
    if not (args.auto_resume and args.output_dir):
        return None
    check_same_kind(Path(args.output_dir), sharded=args.fsdp)
    for path in resume_candidates(Path(args.output_dir), sharded=args.fsdp):
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


OPTIMIZER_KERNEL_KEYS = ("fused", "foreach")


def load_weights_and_optimizer(state: TrainingState, path: Path, checkpoint: Mapping[str, Any],
                               args: argparse.Namespace) -> None:
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
            f"checkpoint {path} does not fit --model {args.model}: {mismatch}; pass a "
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


def optimizer_kernels(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """Each group's kernel choice (fused, foreach), which a loaded state must not override."""
    return [{key: group[key] for key in OPTIMIZER_KERNEL_KEYS if key in group} for group in optimizer.param_groups]


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """The checkpoint's moments and hyperparameters with this run's kernel choice.

    ``Optimizer.load_state_dict`` takes every group setting from the checkpoint, ``fused`` too, so a
    state saved unfused (or on another device) would silently switch the fused kernel off here.
    """
    groups = [{**saved, **kernel} for saved, kernel in zip(state["param_groups"], optimizer_kernels(optimizer))]
    optimizer.load_state_dict({**state, "param_groups": groups})


@dataclass(frozen=True)
class Resume:
    """What a run continues from: the checkpoint (empty when it starts afresh) and the first epoch
    to train, the one in progress after a step checkpoint, the next one after an epoch's."""

    checkpoint: Mapping[str, Any]
    epoch: int


def resume_training_state(state: TrainingState, args: argparse.Namespace) -> Resume:
    """Continue from ``--resume``, or the newest checkpoint when ``--auto_resume``: its weights and
    optimizer state into ``state``, and where the run continues (``--start_epoch`` when fresh). A
    collective: call it on every rank."""
    path, checkpoint = find_resume_checkpoint(args)
    if not checkpoint:
        return Resume({}, args.start_epoch)
    folder = sharded_checkpoint.is_sharded_checkpoint(path)
    if folder and not is_sharded(state.model):
        raise UsageError(f"checkpoint {path} is a sharded folder: resume it with --fsdp, or make one file of its "
                         "weights with consolidate_checkpoint.py")
    if is_sharded(state.model) and not folder:
        raise UsageError(f"checkpoint {path} is one file, and --fsdp resumes the folders it writes: resume it "
                         "without --fsdp")
    load_weights_and_optimizer(state, path, checkpoint, args)
    epoch = args.start_epoch
    if "optimizer" in checkpoint or folder:
        state.scaler.load_state_dict(checkpoint["scaler"])
        epoch = checkpoint["epoch"] + (0 if "step" in checkpoint else 1)
    if is_main_process():
        where = f"epoch {epoch}" + (f" step {checkpoint['step']}" if "step" in checkpoint else "")
        print(f"resumed from {path} at {where}")
        for change in (batch_change(checkpoint.get("args", {}), args), order_change(checkpoint, args)):
            if change:
                print(change)
    return Resume(checkpoint, epoch)


ORDER_FLAGS = ("seed", "data_path", "num_samples", "shuffle_window")  # what the order of an epoch follows


def order_change(checkpoint: Mapping[str, Any], args: argparse.Namespace) -> str:
    """One line when a checkpoint written mid-epoch was made under another order of the epoch: the
    positions it counts as done then name other samples, so that epoch is no longer exact."""
    written_by = checkpoint.get("args", {})
    changed = [flag for flag in ORDER_FLAGS
               if flag in written_by and written_by[flag] != getattr(args, flag, written_by[flag])]
    if "step" not in checkpoint or not changed:
        return ""
    flags = ", ".join(f"--{flag} {written_by[flag]} then, {getattr(args, flag)} now" for flag in changed)
    return (f"warning: the order of epoch {checkpoint['epoch']} changed ({flags}): the rest of it follows the new "
            "order, so some of its samples may be trained twice and others not at all; later epochs are exact")


def batch_change(written_by: Mapping[str, Any], args: argparse.Namespace) -> str:
    """One line when the effective batch differs from the checkpoint's run, saying how the lr follows."""
    before, now = written_by.get("eff_batch_size"), args.eff_batch_size
    if before is None or before == now:
        return ""
    processes = f"{args.world_size} process" + ("es" if args.world_size > 1 else "")
    shape = f"{processes} x {args.batch_size} x {args.accum_iter} accumulation steps"
    if written_by.get("lr") == args.lr:
        follows = f"lr {args.lr:.3e} stays as --lr gives it"
    else:
        follows = f"lr = blr {args.blr:g} x {now} / 256 = {args.lr:.3e} (was {written_by.get('lr', float('nan')):.3e})"
    return f"effective batch {before} in the checkpoint, {now} now ({shape}): {follows}"


def epoch_start(checkpoint: Mapping[str, Any], epoch: int) -> EpochStart:
    """Where ``epoch`` begins: part-way through when ``checkpoint`` was written mid-way through it."""
    if "step" not in checkpoint or checkpoint["epoch"] != epoch:
        return EpochStart()
    if "samples_done" in checkpoint:
        return EpochStart(samples_done=checkpoint["samples_done"], samples_per_epoch=checkpoint["samples_per_epoch"],
                          loss_sums=tuple(checkpoint["loss_sums"]), losses_counted=checkpoint["losses_counted"])
    # written before positions were counted: ``step`` batches on each rank, and rank 0's loss sum,
    # which every rank then resumed from
    written_by = checkpoint["args"]
    world_size, step = written_by.get("world_size", 1), checkpoint["step"]
    return EpochStart(samples_done=step * written_by["batch_size"] * world_size,
                      loss_sums=(checkpoint["loss_sum"],) * world_size, losses_counted=step * world_size)
