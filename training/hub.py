"""Checkpoints by Hugging Face Hub name: ``--finetune``, ``--init_from``, ``run_mae_vis.py
--model_path`` and ``convert_checkpoint.py`` take ``ORG/NAME`` (a transformers ``ViTMAE`` repository
such as ``facebook/vit-mae-base``) or ``hf-hub:ORG/NAME`` (timm's weights), fetched through the Hub's
own cache (``HF_HOME``, ``HF_HUB_CACHE``) and its offline mode (``HF_HUB_OFFLINE=1``: the cache only).

A value that exists on disk is always a path. A name that is neither a path nor in the cache
(offline) nor on the Hub (online) is one ``error:`` line.
"""
import re
from pathlib import Path

from utils import UsageError

TIMM_PREFIX = "hf-hub:"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # ORG/NAME, as the Hub spells a repository
# what a repository's snapshot needs: the config, the weights, the image processor; not every format
WANTED = ["*.json", "model.safetensors", "pytorch_model.bin"]


def is_hub_name(value: str) -> bool:
    """``hf-hub:ORG/NAME``, or ``ORG/NAME`` that is not a path on this machine."""
    name = value.removeprefix(TIMM_PREFIX)
    return bool(value) and not Path(value).exists() and bool(REPO_ID.match(name))


def resolve_checkpoint(value: str, flag: str) -> str:
    """The local path ``value`` names: itself when not a hub name, else the repository's folder in
    the Hub cache (``ORG/NAME``) or its weight file (``hf-hub:ORG/NAME``, read as timm's state dict)."""
    if not is_hub_name(value):
        return value
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id = value.removeprefix(TIMM_PREFIX)
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=WANTED))
    except LocalEntryNotFoundError as error:
        where = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise UsageError(f"{flag} {value}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {where}; "
                         "download it once online, or give a path") from error
    except RepositoryNotFoundError as error:
        raise UsageError(f"{flag} {value}: no such repository on the Hugging Face Hub (or it is private: "
                         "log in with `hf auth login`)") from error
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise UsageError(f"{flag} {value}: the Hugging Face Hub failed: {' '.join(str(error).split())[:200]}") from error
    if not value.startswith(TIMM_PREFIX):
        return str(folder)
    weights = next((folder / name for name in WANTED[1:] if (folder / name).is_file()), None)
    if weights is None:
        raise UsageError(f"{flag} {value}: the repository has no model.safetensors or pytorch_model.bin")
    return str(weights)
