"""Checkpoint files as files: written atomically (a failed write is one ``RunFailure``), read with
``weights_only`` and memory-mapped (a pickle that would run code is refused), and a damaged file
told apart from every other reason a read fails, since only damage sends a resume to an older one.
"""
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from training import sharded_checkpoint
from utils import RunFailure, UsageError, atomic_write


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


def save_files(payload: Mapping[str, Any], paths: List[Path]) -> Optional[RunFailure]:
    """``save_atomic`` to each of ``paths``; the failure, if one happened, to hand to the other ranks."""
    try:
        for path in paths:
            save_atomic(payload, path)
    except RunFailure as error:
        return error
    return None


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
    if path.suffix == ".safetensors":  # timm's and the Hub's weight files: a state dict, no code
        from safetensors.torch import load_file

        return {"model": load_file(str(path))}
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
