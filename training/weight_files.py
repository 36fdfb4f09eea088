"""Any checkpoint's weights and args, whoever wrote it: ours, the official MAE's or timm's file, a
sharded folder (made whole here), or a Hugging Face ViTMAE folder or weight file (in our keys)."""
import pickle
from pathlib import Path
from typing import Any, Dict, Mapping

import torch

from training import hf_checkpoint
from training import sharded_checkpoint
from training.checkpoint_files import load_checkpoint, read_checkpoint, refused
from utils import UsageError


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
