"""Hugging Face ``ViTMAEForPreTraining`` checkpoints, both ways: our (or an official MAE) state dict
to a ``save_pretrained`` folder, and such a folder (or its ``model.safetensors`` /
``pytorch_model.bin``) back to our keys and args.

transformers 4.x names a block's parts ``attention.attention.query`` ... ``intermediate.dense``;
5.x renamed them ``attention.q_proj`` ... ``mlp.fc1`` in the model (its encoder's blocks
``vit.layers``), while its ``save_pretrained`` writes the 4.x part names again, with the decoder's
blocks as ``decoder.decoder_encoder.layer`` (5.24). All of these are read; a folder is written by the
installed transformers' own ``save_pretrained``. Only writing needs transformers; reading needs
``safetensors`` for ``.safetensors`` files. Nothing is downloaded.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from image_data.geometry import to_grid
from modeling_pretrain import MAE_CONFIGS

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
V4, V5 = 0, 1  # transformers' key layouts
QKV = (("attention.attention.query", "attention.attention.key", "attention.attention.value"),
       ("attention.q_proj", "attention.k_proj", "attention.v_proj"))
BLOCK_PARTS = {  # ours (after the block prefix) -> (4.x, 5.x)
    "attn.proj": ("attention.output.dense", "attention.o_proj"),
    "mlp.fc1": ("intermediate.dense", "mlp.fc1"),
    "mlp.fc2": ("output.dense", "mlp.fc2"),
    "norm1": ("layernorm_before", "layernorm_before"),
    "norm2": ("layernorm_after", "layernorm_after"),
}
BLOCK_PREFIXES = {  # ours -> the model's in (4.x, 5.x)
    "blocks": ("vit.encoder.layer", "vit.layers"),
    "decoder_blocks": ("decoder.decoder_layers", "decoder.decoder_layers"),
}
SAVED_BLOCK_PREFIXES = {  # ours -> every prefix a saved folder may use
    "blocks": ("vit.encoder.layer", "vit.layers"),
    "decoder_blocks": ("decoder.decoder_layers", "decoder.decoder_encoder.layer"),
}
TOP_LEVEL = {  # ours -> both layouts
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}


# ----------------------------------------------------------------------------- keys


def count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many blocks ``prefix.{i}.`` the state has."""
    depth = len(prefix.split("."))
    return len({key.split(".")[depth] for key in state if key.startswith(prefix + ".")})


def to_hf(state: Mapping[str, torch.Tensor], layout: int) -> Dict[str, torch.Tensor]:
    """Our (official MAE) keys -> ``ViTMAEForPreTraining``'s in ``layout``; qkv is split in three."""
    hf = {TOP_LEVEL[key]: value for key, value in state.items() if key in TOP_LEVEL}
    for ours, prefixes in BLOCK_PREFIXES.items():
        for index in range(count_blocks(state, ours)):
            source, target = f"{ours}.{index}.", f"{prefixes[layout]}.{index}."
            for kind in ("weight", "bias"):
                for name, part in zip(QKV[layout], state[f"{source}attn.qkv.{kind}"].chunk(3)):
                    hf[f"{target}{name}.{kind}"] = part.clone()
                for part, names in BLOCK_PARTS.items():
                    hf[f"{target}{names[layout]}.{kind}"] = state[f"{source}{part}.{kind}"]
    return hf


def hf_layout(state: Mapping[str, torch.Tensor]) -> int:
    """Which part names ``state`` uses: 4.x's have ``.attention.attention.query.``."""
    return V4 if any(".attention.attention.query." in key for key in state) else V5


def from_hf(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``ViTMAEForPreTraining`` (or ``ViTMAEModel``, without the ``vit.`` prefix) keys of either
    layout -> ours; q, k and v are joined into qkv."""
    if not any(key.startswith(("vit.", "decoder.")) for key in state):
        state = {f"vit.{key}": value for key, value in state.items()}  # a ViTMAEModel: the encoder alone
    layout = hf_layout(state)
    ours = {key: state[hf] for key, hf in TOP_LEVEL.items() if hf in state}
    for name, prefixes in SAVED_BLOCK_PREFIXES.items():
        prefix = max(prefixes, key=lambda candidate: count_blocks(state, candidate))
        for index in range(count_blocks(state, prefix)):
            source, target = f"{prefix}.{index}.", f"{name}.{index}."
            for kind in ("weight", "bias"):
                ours[f"{target}attn.qkv.{kind}"] = torch.cat([state[f"{source}{part}.{kind}"] for part in QKV[layout]])
                for part, names in BLOCK_PARTS.items():
                    ours[f"{target}{part}.{kind}"] = state[f"{source}{names[layout]}.{kind}"]
    return ours



# ----------------------------------------------------------------------------- sizes


def registered_name(sizes: Mapping[str, Any]) -> Optional[str]:
    """The ``pretrain_mae_*`` model of these encoder and decoder sizes (any patch size), if any."""
    for name, config in MAE_CONFIGS.items():
        if (config.embed_dim, config.depth, config.num_heads, config.decoder_embed_dim, config.decoder_depth,
                config.decoder_num_heads) == tuple(sizes[key] for key in SIZE_KEYS) and \
                round(config.embed_dim * config.mlp_ratio) == sizes["intermediate_size"]:
            return name
    return None


SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "decoder_hidden_size",
             "decoder_num_hidden_layers", "decoder_num_attention_heads")


def hf_config(state: Mapping[str, torch.Tensor], saved: Mapping[str, Any]) -> Dict[str, Any]:
    """``ViTMAEConfig``'s keywords for our state dict and the run's saved args (the heads come from the
    registered model, which the weights cannot tell)."""
    name = saved.get("model")
    if name not in MAE_CONFIGS:
        raise ValueError(f"no registered pretrain_mae_* model named {name!r}: pass --model")
    config = MAE_CONFIGS[name]
    proj = state["patch_embed.proj.weight"]  # (D, C, p, p)
    size = saved.get("input_size") or int(round((state["pos_embed"].shape[1] - 1) ** 0.5)) * proj.shape[-1]
    return dict(
        image_size=size if isinstance(size, int) else list(size), patch_size=proj.shape[-1],
        num_channels=proj.shape[1], hidden_size=proj.shape[0], num_hidden_layers=count_blocks(state, "blocks"),
        num_attention_heads=config.num_heads, intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0],
        decoder_hidden_size=state["decoder_embed.weight"].shape[0],
        decoder_num_hidden_layers=count_blocks(state, "decoder_blocks"),
        decoder_num_attention_heads=config.decoder_num_heads,
        decoder_intermediate_size=state["decoder_blocks.0.mlp.fc1.weight"].shape[0],
        mask_ratio=saved.get("mask_ratio", 0.75), norm_pix_loss=bool(saved.get("norm_pix_loss", False)),
        layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
    )


def args_from_config(config: Mapping[str, Any], preprocessor: Mapping[str, Any]) -> Dict[str, Any]:
    """Our run args for a ``ViTMAEConfig`` (and the image processor's mean and std, if saved)."""
    name = registered_name(config)
    if name is None:
        raise ValueError("no registered pretrain_mae_* model has these sizes: "
                         + ", ".join(f"{key} {config[key]}" for key in SIZE_KEYS))
    size = config["image_size"]
    args = {"model": name, "input_size": size if isinstance(size, int) else list(size),
            "in_chans": config.get("num_channels", 3), "norm_pix_loss": bool(config.get("norm_pix_loss", False)),
            "mask_ratio": config.get("mask_ratio", 0.75),
            "patch_size": None if config["patch_size"] == MAE_CONFIGS[name].patch_size else config["patch_size"]}
    if "image_mean" in preprocessor and "image_std" in preprocessor:
        args.update(mean=list(preprocessor["image_mean"]), std=list(preprocessor["image_std"]))
    return args


# ----------------------------------------------------------------------------- folders


def hf_folder(path: Path) -> Optional[Path]:
    """The ``save_pretrained`` folder ``path`` is, or whose weight file it is; None otherwise."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    named = path.is_dir() or path.name in WEIGHT_FILES
    return folder if named and is_vit_mae_config(folder / CONFIG) and weights_file(folder) else None


def is_vit_mae_config(path: Path) -> bool:
    """A transformers ``ViTMAE`` config (a timm repository's ``config.json`` names an architecture)."""
    try:
        return path.is_file() and json.loads(path.read_text()).get("model_type") == "vit_mae"
    except (OSError, ValueError, AttributeError):
        return False


def weights_file(folder: Path) -> Optional[Path]:
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)


def read_hf_args(path: Path) -> Dict[str, Any]:
    """Our run args of a Hugging Face folder, from its JSON files alone."""
    folder = hf_folder(path)
    preprocessor = folder / PREPROCESSOR
    return args_from_config(json.loads((folder / CONFIG).read_text()),
                            json.loads(preprocessor.read_text()) if preprocessor.is_file() else {})


def read_hf(path: Path) -> Dict[str, Any]:
    """A Hugging Face folder (or weight file) as our checkpoint: ``model`` with our keys, ``args``."""
    folder = hf_folder(path)
    weights = folder / path.name if Path(path).is_file() else weights_file(folder)
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file  # comes with transformers; only reading safetensors needs it

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    return {"model": from_hf(state), "args": read_hf_args(folder)}


def write_hf(state: Mapping[str, torch.Tensor], saved: Mapping[str, Any], folder: Path) -> List[str]:
    """A ``save_pretrained`` folder for ``ViTMAEForPreTraining`` of the installed transformers: its
    config, weights (``model.safetensors``) and image processor (mean, std, size). Returns the keys
    the model lacked or did not expect (none, or the conversion is wrong)."""
    from transformers import ViTImageProcessor, ViTMAEConfig, ViTMAEForPreTraining
    from transformers.utils import logging

    logging.disable_progress_bar()  # one folder, written at once
    if "decoder_pred.weight" not in state:
        raise ValueError("the checkpoint has no decoder, which ViTMAEForPreTraining needs")
    config = hf_config(state, saved)
    model = ViTMAEForPreTraining(ViTMAEConfig(**config))
    result = model.load_state_dict(to_hf(state, hf_layout(model.state_dict())), strict=False)
    model.save_pretrained(folder)
    height, width = to_grid(config["image_size"])
    processor = ViTImageProcessor(image_mean=saved.get("mean", list(IMAGENET_DEFAULT_MEAN)),
                                  image_std=saved.get("std", list(IMAGENET_DEFAULT_STD)),
                                  size={"height": height, "width": width}, resample=3)  # 3: bicubic
    processor.save_pretrained(folder)
    return sorted(result.missing_keys + result.unexpected_keys)
