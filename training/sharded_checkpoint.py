"""Sharded checkpoints (``--fsdp``): one folder per checkpoint, in which every rank writes its shards
of the model and the optimizer with ``torch.distributed.checkpoint`` (DCP), which reshards them
when they are loaded on another number of processes. The checkpoint's plain values (epoch, args,
grad scaler, the position in the epoch) are in ``meta.json`` beside them.

A folder is written under a temporary name and renamed once complete; ``checkpoint-last`` and
``checkpoint-best``, which every save replaces, are links to such folders, swapped atomically. So
a kill leaves every name pointing at a complete checkpoint. DCP's own metadata file is a pickle:
it is read here by an unpickler that knows DCP's metadata classes and nothing else.
"""
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from training.wrapping import unwrap_model
from utils import RunFailure, UsageError, atomic_write, barrier, is_main_process, raise_on_all_ranks

META = "meta.json"
MOVING = ("checkpoint-last", "checkpoint-best")  # names every save replaces: links to a folder
METADATA_NAMES = {  # besides the classes of DCP's metadata module, torch.Size and torch's dtypes
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout from its name
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class UnsafeMetadataError(pickle.UnpicklingError):
    """The metadata names something that is not DCP's: refused before anything of it runs."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata: its dataclasses, sizes, dtypes and paths; nothing else, so a
    crafted file cannot name a function to call."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata" and isinstance(getattr(dcp_metadata, name, None), type):
            return getattr(dcp_metadata, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if name in METADATA_NAMES.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeMetadataError(f"{module}.{name} is not part of DCP's metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader with the metadata read by ``MetadataUnpickler`` (tensor data and other
    values DCP reads with ``torch.load(weights_only=True)`` already)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as handle:
            metadata = MetadataUnpickler(handle).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError("the checkpoint's .metadata holds no DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class IncompleteCheckpointError(OSError):
    """A sharded checkpoint folder that was never completed or lost a file: damaged, not unreadable."""


def is_sharded_checkpoint(path: Path) -> bool:
    return Path(path).is_dir()


def read_meta(path: Path) -> Dict[str, Any]:
    """The plain values of a sharded checkpoint; a folder without them was never completed."""
    try:
        return json.loads((Path(path) / META).read_text())
    except (OSError, ValueError) as error:
        raise IncompleteCheckpointError(f"{path} holds no complete sharded checkpoint ({error})") from error


def read_metadata(path: Path) -> Metadata:
    return SafeReader(path).read_metadata()


def check_complete(path: Path) -> None:
    """Every shard the metadata names is there, as long as it says (a copy cut short, a lost
    file): ``IncompleteCheckpointError`` if not."""
    for info in read_metadata(path).storage_data.values():
        shard = Path(path) / info.relative_path
        if not shard.is_file() or shard.stat().st_size < info.offset + info.length:
            raise IncompleteCheckpointError(f"its shard {info.relative_path} is missing or cut short")


def model_shapes(path: Path) -> Dict[str, torch.Size]:
    """Every model tensor of a sharded checkpoint and its whole (unsharded) shape."""
    return {key.removeprefix("model."): item.size for key, item in read_metadata(path).state_dict_metadata.items()
            if key.startswith("model.") and isinstance(item, TensorStorageMetadata)}


def tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """What DCP saves and loads: model and optimizer state keyed by parameter names (collective)."""
    model = unwrap_model(model)
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, output_dir: Path, names: List[str],
         meta: Mapping[str, Any]) -> Path:
    """Write one sharded checkpoint (collective) and give it every name of ``names``.

    A numbered name is the folder itself; the moving names become links to it (or, without a
    numbered name, to a hidden folder of its own). Returns the folder.
    """
    output_dir = Path(output_dir)
    fixed = [name for name in names if name not in MOVING]
    position = f"e{meta['epoch']}" + (f"-s{meta['step']}" if "step" in meta else "")
    folder = output_dir / (fixed[0] if fixed else f".{names[0]}-{position}")  # the same name on every rank
    tmp = folder.with_name(f".{folder.name}.tmp")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    error = None
    try:
        dcp.save(tensors(model, optimizer), checkpoint_id=tmp)
    except (CheckpointException, OSError) as raised:  # DCP raises on every rank when any rank failed
        error = write_failure(folder, raised)
    if error is None and is_main_process():
        try:
            with atomic_write(tmp / META) as meta_tmp:
                meta_tmp.write_text(json.dumps(dict(meta)))
            replace_folder(tmp, folder)
            for name in names:
                if name in MOVING:
                    point(output_dir / name, folder)
        except OSError as raised:
            error = write_failure(folder, raised)
    if error is not None and is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    raise_on_all_ranks(error)
    return folder


def write_failure(folder: Path, error: BaseException) -> RunFailure:
    """A sharded checkpoint that could not be written (a full disk, a quota), and what is left."""
    return RunFailure(f"could not write checkpoint {folder}: {root_cause(error)}; the checkpoints written before it "
                      "are intact")


def root_cause(error: BaseException) -> str:
    """One line for what went wrong: the OS's words for a failed write, else the first failing
    rank's exception that DCP wrapped (its own message starts with a traceback)."""
    if isinstance(error, CheckpointException) and error.failures:
        error = error.failures[min(error.failures)][0]
    causes = [found for found in (error, error.__cause__, error.__context__) if isinstance(found, OSError)]
    if causes and causes[0].strerror:
        return causes[0].strerror
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


def replace_folder(new: Path, folder: Path) -> None:
    """Rename ``new`` to ``folder``, moving an older one of that name aside first and deleting it."""
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.rename(folder, old)
    os.rename(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def point(link: Path, folder: Path) -> None:
    """Make ``link`` point at ``folder`` in one rename, then delete the hidden folder it pointed at
    before, unless another moving name still points at it."""
    previous = link.resolve() if link.is_symlink() else None
    tmp = link.with_name(f".{link.name}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(folder.name, tmp)
    os.replace(tmp, link)
    still_used = {(link.parent / name).resolve() for name in MOVING if (link.parent / name).is_symlink()}
    if previous is not None and previous.name.startswith(".") and previous not in still_used:
        shutil.rmtree(previous, ignore_errors=True)


def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Load a sharded checkpoint's model and optimizer state into this run's (collective),
    resharded for its number of processes."""
    state = tensors(model, optimizer)
    dcp.load(state, checkpoint_id=path, storage_reader=SafeReader(path))
    model = unwrap_model(model)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def full_model_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The whole model's state on rank 0's CPU (collective; the other ranks get nothing)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(unwrap_model(model), options=options)


def read_model_state(path: Path) -> Dict[str, torch.Tensor]:
    """The whole model state of a sharded checkpoint, in this one process (no process group)."""
    metadata = read_metadata(path)
    state = {key: torch.empty(item.size, dtype=item.properties.dtype)
             for key, item in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(item, TensorStorageMetadata)}
    if not state:
        raise UsageError(f"{path} holds no model tensors")
    nested = {"model": {key.removeprefix("model."): value for key, value in state.items()}}
    with warnings.catch_warnings():  # that no process group is there is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(nested, checkpoint_id=path, storage_reader=SafeReader(path), no_dist=True)
    return nested["model"]
