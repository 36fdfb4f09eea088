"""Loading a pretrained MAE encoder into timm's ViT for finetuning, as the official MAE's
``main_finetune.py`` does: which keys are new, which must match, and how the position table and
the head start."""
import pytest
import timm
import torch

from helpers import tiny_mae
from modeling_finetune import CheckpointMismatchError, create_finetune_model, load_pretrained_encoder


@pytest.fixture(scope="module")
def pretrained_state():
    return tiny_mae(img_size=32).state_dict()


def finetune_model(img_size=32, **kwargs):
    torch.manual_seed(1)
    return create_finetune_model("vit_tiny_patch16_224", num_classes=5, img_size=img_size, depth=2, **kwargs)


def test_loader_reports_head_and_fc_norm_missing_with_global_pool(pretrained_state):
    missing = load_pretrained_encoder(finetune_model(), {"model": pretrained_state})
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]


def test_loader_reports_only_head_missing_with_cls_token(pretrained_state):
    missing = load_pretrained_encoder(finetune_model(global_pool=False), {"model": pretrained_state})
    assert sorted(missing) == ["head.bias", "head.weight"]


def test_loaded_encoder_weights_equal_the_checkpoint(pretrained_state):
    model = finetune_model(global_pool=False)
    load_pretrained_encoder(model, {"model": pretrained_state})
    loaded = model.state_dict()
    for name in loaded:
        if not name.startswith("head."):
            assert torch.equal(loaded[name], pretrained_state[name]), name


def test_loader_strips_module_prefixes(pretrained_state):
    model = finetune_model()
    prefixed = {"module." + name: value for name, value in pretrained_state.items()}
    load_pretrained_encoder(model, {"model": prefixed})
    assert torch.equal(model.blocks[1].mlp.fc2.weight, pretrained_state["blocks.1.mlp.fc2.weight"])


def test_loader_accepts_an_encoder_only_state_dict(pretrained_state):
    encoder = {
        name: value for name, value in pretrained_state.items()
        if not name.startswith("decoder_") and name != "mask_token"
    }
    model = finetune_model()
    load_pretrained_encoder(model, encoder)
    assert torch.equal(model.blocks[0].attn.qkv.weight, pretrained_state["blocks.0.attn.qkv.weight"])


def test_new_head_starts_tiny(pretrained_state):
    model = finetune_model()
    load_pretrained_encoder(model, {"model": pretrained_state})
    assert 1.6e-5 < model.head.weight.std().item() < 2.4e-5
    assert not model.head.bias.any()


def test_loader_resamples_pos_embed_to_a_larger_image(pretrained_state):
    model = finetune_model(img_size=64)  # 2 x 2 patches pretrained, 4 x 4 finetuned
    load_pretrained_encoder(model, {"model": pretrained_state})
    assert model.pos_embed.shape == (1, 17, 192)
    assert torch.equal(model.pos_embed[0, 0], pretrained_state["pos_embed"][0, 0])


def test_loader_names_shape_mismatches_of_a_wider_checkpoint():
    torch.manual_seed(0)
    small = timm.create_model("pretrain_mae_small_patch16_224", img_size=32, depth=2).state_dict()
    with pytest.raises(CheckpointMismatchError) as error:
        load_pretrained_encoder(finetune_model(), {"model": small})
    message = str(error.value)
    assert "cls_token" in message and "384" in message and "192" in message


def test_loader_names_a_missing_block_key(pretrained_state):
    damaged = {name: value for name, value in pretrained_state.items() if name != "blocks.1.mlp.fc2.weight"}
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.1\.mlp\.fc2\.weight"):
        load_pretrained_encoder(finetune_model(), {"model": damaged})
