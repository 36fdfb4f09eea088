"""The registered models against their sources: the official MAE's key names and parameter count,
timm's registry (names, no downloads, no warnings), and the billion-scale sizes of the papers."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import modeling_pretrain  # noqa: F401  (registers the pretrain_mae_* names with timm)
from helpers import tiny_mae
from modeling_finetune import create_finetune_model

REPO_ROOT = Path(__file__).resolve().parents[1]
BLOCK_SUBKEYS = [
    f"{layer}.{kind}"
    for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for kind in ("weight", "bias")
]


def test_state_dict_keys_are_the_official_mae_keys():
    model = tiny_mae()
    expected = {
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
        "norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias", "mask_token",
        "decoder_pos_embed", "decoder_norm.weight", "decoder_norm.bias",
        "decoder_pred.weight", "decoder_pred.bias",
    }
    expected |= {f"blocks.{i}.{sub}" for i in range(2) for sub in BLOCK_SUBKEYS}
    expected |= {f"decoder_blocks.{i}.{sub}" for i in range(2) for sub in BLOCK_SUBKEYS}
    assert set(model.state_dict()) == expected


def test_base_has_the_official_parameter_count():
    def block(d):  # two LayerNorms, qkv, proj, fc1 (4d), fc2
        return 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)

    tokens = 1 + 14 * 14
    encoder = (768 * 3 * 16 * 16 + 768) + 768 + tokens * 768 + 12 * block(768) + 2 * 768
    decoder = (768 * 512 + 512) + 512 + tokens * 512 + 8 * block(512) + 2 * 512 + (512 * 768 + 768)
    assert encoder + decoder == 111_907_840  # the official mae_vit_base_patch16 count
    model = timm.create_model("pretrain_mae_base_patch16_224")
    assert sum(p.numel() for p in model.parameters()) == 111_907_840


# --------------------------------------------------------------------------- timm registry


def test_creating_a_model_from_a_fresh_interpreter_warns_nothing():
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c",
         "import timm, modeling_pretrain; timm.create_model('pretrain_mae_base_patch16_224')"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_timm_lists_all_five_sizes():
    assert set(timm.list_models("pretrain_mae*")) >= {
        "pretrain_mae_tiny_patch16_224", "pretrain_mae_small_patch16_224", "pretrain_mae_base_patch16_224",
        "pretrain_mae_large_patch16_224", "pretrain_mae_huge_patch14_224",
    }


def test_pretrained_weights_are_refused():
    with pytest.raises(ValueError):
        timm.create_model("pretrain_mae_tiny_patch16_224", pretrained=True, depth=1)


def vit_parameters(dim: int, depth: int, hidden: int, num_patches: int, patch_pixels: int) -> int:
    """A ViT encoder's parameters by hand: per block qkv 3d^2 + 3d, proj d^2 + d, MLP 2dh + h + d,
    two LayerNorms 4d; the patch embedding, cls token, position table (with the cls row) and final norm."""
    block = 4 * dim**2 + 2 * dim * hidden + hidden + 9 * dim
    return depth * block + patch_pixels * dim + dim + dim + (num_patches + 1) * dim + 2 * dim


@pytest.mark.parametrize("name, dim, depth, heads, hidden", [
    ("pretrain_mae_giant_patch14_224", 1408, 40, 16, 6144),  # ViT-g/14, Zhai et al. 2022
    ("pretrain_mae_2b_patch14_224", 2560, 24, 32, 10240),  # ViT-2B/14, MAWS (Singh et al. 2023)
])
def test_the_billion_scale_models_have_their_papers_sizes(name, dim, depth, heads, hidden):
    """Counted on the meta device: no memory for a billion weights."""
    with torch.device("meta"):
        model = timm.create_model(name)
    patches, pixels = 16 * 16, 14 * 14 * 3  # 224 / 14 = 16 patches a side
    decoder = vit_parameters(512, 8, 2048, patches, 0) - 512 - 512 + dim * 512 + 512 + 512 + 512 * pixels + pixels
    assert model.blocks[0].attn.num_heads == heads and model.decoder_blocks[0].attn.num_heads == 16
    assert sum(p.numel() for p in model.parameters()) == vit_parameters(dim, depth, hidden, patches, pixels) + decoder
    with torch.device("meta"):
        vit = create_finetune_model(name.replace("pretrain_mae_", "vit_"), 1000)
    head = 2 * dim + dim * 1000 + 1000  # fc_norm, then the linear head
    encoder = vit_parameters(dim, depth, hidden, patches, pixels) - 2 * dim  # fc_norm instead of the final norm
    assert sum(p.numel() for p in vit.parameters()) == encoder + head
