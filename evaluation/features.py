"""Features of a frozen encoder, extracted once across ranks (each sample encoded on exactly one
rank, gathered on all, checked for completeness, as DINOv2 does), for k-NN and the fast linear
probe; which feature (the cls token, the average of the patch tokens, or both); and a cache of
them under the output folder, so a second evaluation of the same encoder and data skips the
encoder."""
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

import utils
from training import precision
from training.checkpoint_files import save_files
from training.preemption import worker_init_fn

Embed = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # (encoder, images) -> (B, D) features
FEATURES = ("cls", "avgpool", "both", "pixels")


def model_features(model: torch.nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """What the encoder as built gives: its cls token after the final norm, or with
    ``--global_pool`` the average of its patch tokens after ``fc_norm`` (the paper's probe input)."""
    return model(imgs)


def token_features(kind: str) -> Embed:
    """``cls``: the cls token after the final norm; ``avgpool``: the average of the patch tokens
    after the final norm; ``both``: the two side by side, (B, 2D); ``pixels``: the normalized
    pixels themselves, (B, C * H * W), no encoder: the floor a linear model on raw pixels sets."""
    if kind not in FEATURES:
        raise ValueError(f"unknown feature {kind!r}; choose from {', '.join(FEATURES)}")
    if kind == "pixels":
        return lambda model, imgs: imgs.flatten(1).float()  # (B, C * H * W)

    def embed(model: torch.nn.Module, imgs: torch.Tensor) -> torch.Tensor:
        tokens = model.forward_features(imgs)  # (B, T, D), the final norm applied
        cls, pooled = tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(dim=1)  # (B, D) each
        return {"cls": cls, "avgpool": pooled, "both": torch.cat([cls, pooled], dim=1)}[kind]

    return embed


def check_pixel_floor(*, features: Optional[str], finetune: str) -> None:
    """The raw pixels have no encoder, so a checkpoint beside them would be read for nothing."""
    if features == "pixels" and finetune:
        raise utils.UsageError("--features pixels is the raw-pixel floor, without an encoder: give it without "
                               "--finetune")


def extract_features(model: torch.nn.Module, dataset: Dataset, **encoding: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(N, D)`` float features and ``(N,)`` labels of the whole dataset, on every rank (a
    collective): each rank encodes its share (``encode_share``, which takes ``encoding``: batch size,
    workers, device, precision, batch transform, feature), ``all_gather`` puts every feature back at
    its index."""
    return gather_by_index(*encode_share(model, dataset, **encoding), len(dataset))


@torch.no_grad()
def encode_share(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    amp: str,
    batch_transform: Callable[[torch.Tensor], torch.Tensor],
    embed: Embed = model_features,
    padded: bool = False,
    stop_signals: Sequence[str] = ("none",),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``(n_r, D)`` features and ``(n_r, 2)`` (index, label) keys: rank r encodes samples
    r, r + world, ... (no padding, so each sample is encoded once), in eval mode; with ``padded`` a
    collective, every rank calling it.

    ``padded``: every rank runs as many forward passes as the rank with the most batches (the
    missing ones on a blank image), as a sharded model needs, whose every pass gathers weights from
    all ranks. The loader's workers leave ``stop_signals`` to this process.
    """
    model.eval()
    indices = torch.tensor(utils.rank_shard(len(dataset)), dtype=torch.long)  # (n_r,) this rank's shard
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, num_workers=num_workers,
                        worker_init_fn=worker_init_fn(stop_signals))
    passes = utils.all_reduce_max(len(loader), device) if padded else len(loader)
    features, labels = [], []
    for imgs, targets in loader:
        imgs = batch_transform(imgs.to(device, non_blocking=True))  # (B, 3, H, W) uint8 -> float
        with precision.autocast(device, amp):
            features.append(embed(model, imgs).float())  # (B, D)
        labels.append(targets.to(device))
    for _ in range(passes - len(loader)):
        with precision.autocast(device, amp):
            embed(model, blank_image(dataset, device))
    if not features:  # more ranks than samples: the width from one blank image
        with precision.autocast(device, amp):
            width = embed(model, blank_image(dataset, device)).shape[1]
        features, labels = [torch.empty(0, width, device=device)], [indices.to(device)]
    return torch.cat(features), torch.stack([indices.to(device), torch.cat(labels)], dim=1)


def blank_image(dataset: Dataset, device: torch.device) -> torch.Tensor:
    """One image of zeros the size of the dataset's: (1, C, H, W)."""
    return torch.zeros(1, *dataset[0][0].shape, device=device)


def gather_by_index(features: torch.Tensor, keys: torch.Tensor, num_samples: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Collect every rank's ``(n_r, D)`` features and ``(n_r, 2)`` (index, label) keys into
    ``(N, D)`` features and ``(N,)`` labels in index order; fails unless each index came once."""
    if utils.get_world_size() > 1:
        features, keys = all_gather_padded(features), all_gather_padded(keys)
    index = keys[:, 0]  # (N,)
    counts = torch.bincount(index, minlength=num_samples)
    if index.numel() != num_samples or not bool((counts == 1).all()):
        raise RuntimeError(f"feature extraction saw {index.numel()} samples for {num_samples} in the dataset, "
                           f"{int((counts == 0).sum())} missing and {int((counts > 1).sum())} repeated")
    ordered = torch.empty_like(features).index_copy_(0, index, features)  # (N, D)
    labels = torch.empty_like(index).index_copy_(0, index, keys[:, 1])  # (N,)
    return ordered, labels


def all_gather_padded(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``(n_r, ...)`` rows; the shards differ by one row at most, so
    each is padded to the largest for ``all_gather`` and cut back after."""
    sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(utils.get_world_size())]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]], device=rows.device))
    longest = int(max(sizes))
    padded = torch.zeros(longest, *rows.shape[1:], dtype=rows.dtype, device=rows.device)  # (n_max, ...)
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([part[: int(size)] for part, size in zip(gathered, sizes)])  # (N, ...)


def cached_features(
    cache: Optional[Path], describe: Mapping[str, Any], extract: Callable[[], Tuple[torch.Tensor, torch.Tensor]]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``extract()``'s features and labels, read from ``cache`` instead when a file there was made
    for the same ``describe`` (encoder, weights, data, feature): the file's name is its hash. Rank 0
    writes it; every rank reads it. ``cache`` None: always extract."""
    if cache is None:
        return extract()
    key = hashlib.sha256(json.dumps(dict(describe), sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(cache) / f"features-{describe.get('split', 'data')}-{key}.pt"
    if utils.broadcast_from_main(path.is_file()):  # rank 0's view: every rank reads, or every rank extracts
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if utils.is_main_process():
            print(f"features of the {describe.get('split', 'data')} split read from {path}", flush=True)
        return saved["features"], saved["labels"]
    features, labels = extract()
    error = None
    if utils.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        error = save_files({"features": features.cpu(), "labels": labels.cpu(),
                            "describe": json.dumps(describe, default=str)}, [path])
    utils.raise_on_all_ranks(error)  # rank 0 has written it, or every rank stops with its cause
    return features, labels
