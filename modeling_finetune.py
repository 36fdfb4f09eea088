"""Finetuning models and the one loader that puts pretrained MAE encoder weights into them.

The finetuning model is timm's own ``VisionTransformer`` (``vit_base_patch16_224`` and so on):
the pretraining model subclasses the same class, so the encoder exists once. ViT-2B/14, which timm
does not have, is registered here as ``vit_2b_patch14_224``.
"""
import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models import VisionTransformer, register_model

WRAPPER_KEYS = ("model", "state_dict", "model_ema")
KEY_PREFIXES = ("module.", "encoder.", "backbone.")
HEAD_KEYS = ("head.weight", "head.bias")
FC_NORM_KEYS = ("fc_norm.weight", "fc_norm.bias")
FINAL_NORM_KEYS = ("norm.weight", "norm.bias")


# timm's factory passes these to every entrypoint; they concern hub weights we never fetch.
FACTORY_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def model_kwargs(name: str, pretrained: bool, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """An entrypoint's keywords for the model itself; ``pretrained`` is refused, since nothing is
    ever downloaded."""
    if pretrained:
        raise ValueError(
            f"{name}: weights are never downloaded; build it with pretrained=False and load a "
            "checkpoint file with load_state_dict (official MAE checkpoints load strictly)"
        )
    return {key: value for key, value in kwargs.items() if key not in FACTORY_ONLY_KWARGS}


@register_model
def vit_2b_patch14_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-2B/14 of MAWS (Singh et al., 2023): width 2560, 24 blocks, 32 heads, MLP 10240."""
    config = dict(patch_size=14, embed_dim=2560, depth=24, num_heads=32, mlp_ratio=4.0)
    return VisionTransformer(**{**config, **model_kwargs("vit_2b_patch14_224", pretrained, kwargs)})


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys do not fit the model beyond the expected head keys."""


def create_finetune_model(
    model_name: str,
    num_classes: int,
    img_size: int = 224,
    global_pool: bool = True,
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> VisionTransformer:
    """timm's ViT set up as MAE finetunes it: average pooling with ``fc_norm`` by default.

    With ``global_pool=False`` the cls token is the feature and the final ``norm`` stays.
    """
    return timm.create_model(
        model_name,
        pretrained=False,
        num_classes=num_classes,
        img_size=img_size,
        global_pool="avg" if global_pool else "token",
        drop_path_rate=drop_path_rate,
        **kwargs,
    )


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The plain state dict inside our, the official or a timm checkpoint, without prefixes."""
    state = checkpoint
    for key in WRAPPER_KEYS:
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    unwrapped = {}
    for name, value in state.items():
        for prefix in KEY_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        unwrapped[name] = value
    return unwrapped


def is_decoder_key(name: str) -> bool:
    return name.startswith("decoder_") or name == "mask_token"


def encoder_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the decoder (and any old classifier head): finetuning starts a new head."""
    return {name: value for name, value in state.items() if not is_decoder_key(name) and name not in HEAD_KEYS}


def source_grid(checkpoint: Mapping[str, Any], num_patches: int, patch_size: int) -> Tuple[int, int]:
    """The patch grid the checkpoint was trained on: square unless its args say otherwise."""
    args = checkpoint.get("args")
    input_size = args.get("input_size") if isinstance(args, Mapping) else None
    if isinstance(input_size, Sequence) and len(input_size) == 2:
        grid = (int(input_size[0]) // patch_size, int(input_size[1]) // patch_size)
        if grid[0] * grid[1] == num_patches:
            return grid
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise CheckpointMismatchError(
            f"pos_embed has {num_patches} patch positions, which is no square grid, and the "
            "checkpoint's args do not give its input size; resample it before loading"
        )
    return side, side


def resample_pos_embed(
    state: Dict[str, torch.Tensor], checkpoint: Mapping[str, Any], model: VisionTransformer
) -> None:
    """Bicubic resampling of ``pos_embed`` to the model's patch grid, in place."""
    pos_embed = state.get("pos_embed")
    if pos_embed is None or pos_embed.shape == model.pos_embed.shape:
        return
    prefix = model.num_prefix_tokens
    patch_size = model.patch_embed.patch_size[0]
    old_grid = source_grid(checkpoint, pos_embed.shape[1] - prefix, patch_size)
    state["pos_embed"] = resample_abs_pos_embed(
        pos_embed, new_size=list(model.patch_embed.grid_size), old_size=list(old_grid), num_prefix_tokens=prefix
    )


def expected_missing_keys(model: VisionTransformer) -> List[str]:
    """Keys a fresh finetuning model may lack in a pretraining checkpoint: its new head."""
    names = set(model.state_dict())
    return sorted(key for key in HEAD_KEYS + FC_NORM_KEYS if key in names)


def load_pretrained_encoder(model: VisionTransformer, checkpoint: Mapping[str, Any]) -> List[str]:
    """Load MAE (ours or official, encoder-only or full) or timm weights into a finetuning ViT.

    The only keys allowed to be missing are the new head's (``head.*``, and ``fc_norm.*`` with
    global pooling); the only ones allowed to be left over are the final ``norm.*``, which
    global pooling replaces. Anything else raises ``CheckpointMismatchError`` listing the keys.
    The new head starts at trunc-normal std 2e-5, as in MAE. Returns the missing keys.
    """
    state = encoder_state_dict(unwrap_state_dict(checkpoint))
    resample_pos_embed(state, checkpoint, model)
    model_state = model.state_dict()
    model_keys = set(model_state)
    if isinstance(model.norm, nn.Identity):
        state = {name: value for name, value in state.items() if name not in FINAL_NORM_KEYS}
    missing = sorted(model_keys - set(state))
    unexpected = sorted(set(state) - model_keys)
    allowed = expected_missing_keys(model)
    wrong_missing = [key for key in missing if key not in allowed]
    if wrong_missing or unexpected:
        raise CheckpointMismatchError(
            "checkpoint does not fit the model: missing "
            f"{wrong_missing or 'nothing'}, unexpected {unexpected or 'nothing'} "
            "(is --model the same architecture the checkpoint was pretrained with?)"
        )
    shape_errors = [
        f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(model_state[name].shape)}"
        for name, value in state.items()
        if value.shape != model_state[name].shape
    ]
    if shape_errors:
        raise CheckpointMismatchError("checkpoint shapes do not fit the model: " + "; ".join(shape_errors))
    model.load_state_dict(state, strict=False)
    init_head(model)
    return missing


def init_head(model: VisionTransformer, std: float = 2e-5) -> None:
    """MAE's new-head initialization: tiny weights so finetuning starts from the features."""
    if isinstance(model.head, nn.Linear):
        trunc_normal_(model.head.weight, std=std)
        nn.init.zeros_(model.head.bias)


def state_mismatch(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """The missing, unexpected and wrongly shaped keys of ``state`` for ``model``; '' if it fits."""
    own = model.state_dict()
    shapes = [f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
              for key in sorted(own.keys() & state.keys()) if tuple(state[key].shape) != tuple(own[key].shape)]
    parts = {"missing": sorted(own.keys() - state.keys()), "unexpected": sorted(state.keys() - own.keys()),
             "shapes (checkpoint vs model)": shapes}
    return "; ".join(f"{name}: {', '.join(keys[:8])}" + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
                     for name, keys in parts.items() if keys)
