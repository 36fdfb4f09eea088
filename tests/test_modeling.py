"""The MAE pretraining model, checked against something outside the code: the paper's formulas
written out here, the official MAE code's layout, timm's ViT."""
import math

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import modeling_pretrain  # noqa: F401  (registers the pretrain_mae_* names with timm)
from helpers import tiny_mae
from masking_generator import random_masks
from modeling_finetune import create_finetune_model
from modeling_pretrain import PretrainVisionTransformer, sincos_2d_pos_embed, split_indices


def images(batch, height, width, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def masks(batch, num_patches, ratio=0.75, seed=0):
    return random_masks(batch, num_patches, ratio, generator=torch.Generator().manual_seed(seed))


def official_patchify(imgs, p):
    """models_mae.py's patchify, written out: (N, 3, H, W) -> (N, L, p*p*3)."""
    n, c, height, width = imgs.shape
    h, w = height // p, width // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def hand_sincos_table(dim, rows, cols):
    """The 2-D table entry by entry: columns in the first half of channels, rows in the second."""
    quarter = dim // 4
    table = torch.zeros(rows * cols, dim, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            for i in range(quarter):
                omega = 1.0 / 10000 ** (i / quarter)
                table[r * cols + c, i] = math.sin(c * omega)
                table[r * cols + c, quarter + i] = math.cos(c * omega)
                table[r * cols + c, 2 * quarter + i] = math.sin(r * omega)
                table[r * cols + c, 3 * quarter + i] = math.cos(r * omega)
    return table


def masked_targets(imgs, mask, p):
    """Each sample's masked patches in ascending patch order: (B, N_mask, p*p*C)."""
    patches = official_patchify(imgs, p)
    return torch.stack([patches[b][mask[b]] for b in range(len(mask))])


# --------------------------------------------------------------------------- position tables


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_sincos_table_matches_the_formula(grid):
    rows, cols = grid
    table = sincos_2d_pos_embed(16, grid, cls_token=True)
    assert table.shape == (1 + rows * cols, 16)
    torch.testing.assert_close(table[1:].double(), hand_sincos_table(16, rows, cols), atol=1e-6, rtol=0)


def test_sincos_table_cls_row_is_zero():
    table = sincos_2d_pos_embed(32, (3, 5), cls_token=True)
    assert torch.equal(table[0], torch.zeros(32))


def test_model_tables_follow_rows_and_columns_of_a_nonsquare_image():
    # 32 x 48 pixels at patch 16: 2 rows, 3 columns.
    model = tiny_mae(img_size=(32, 48))
    torch.testing.assert_close(model.pos_embed[0, 1:].double(), hand_sincos_table(192, 2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        model.decoder_pos_embed[0, 1:].double(), hand_sincos_table(128, 2, 3), atol=1e-6, rtol=0
    )


def test_position_tables_are_frozen_parameters_in_the_state_dict():
    model = tiny_mae()
    parameters = dict(model.named_parameters())
    state = model.state_dict()
    for name in ("pos_embed", "decoder_pos_embed"):
        assert name in parameters and name in state
        assert parameters[name].requires_grad is False


def test_position_tables_get_no_gradient():
    model = tiny_mae().train()
    imgs, mask = images(2, 64, 64), masks(2, 16)
    model.forward_loss(imgs, model(imgs, mask), mask).backward()
    assert model.pos_embed.grad is None
    assert model.decoder_pos_embed.grad is None
    assert model.cls_token.grad is not None  # the backward did reach the encoder's inputs


# --------------------------------------------------------------------------- patches


@pytest.mark.parametrize("img_size", [64, (32, 48)])
def test_unpatchify_inverts_patchify(img_size):
    model = tiny_mae(img_size=img_size)
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    imgs = images(2, height, width)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)


def test_patchify_orders_pixels_row_column_channel():
    model = tiny_mae()
    p, chans = 16, 3
    imgs = images(1, 64, 64)
    patches = model.patchify(imgs)
    assert patches.shape == (1, 16, p * p * chans)
    for pi in range(p):
        for qi in range(p):
            for ci in range(chans):
                index = (pi * p + qi) * chans + ci
                assert patches[0, 0, index] == imgs[0, ci, pi, qi]
                assert patches[0, 1, index] == imgs[0, ci, pi, p + qi]  # the next patch to the right


# --------------------------------------------------------------------------- forward and loss


@pytest.mark.parametrize(
    "img_size, patch_size, num_patches, expected_masked",
    [
        (64, 16, 16, 12),  # int(16 * 0.25) = 4 visible
        ((32, 48), 16, 6, 5),  # int(6 * 0.25) = 1 visible
        ((32, 48), 8, 24, 18),  # int(24 * 0.25) = 6 visible
    ],
)
def test_forward_predicts_every_masked_patch(img_size, patch_size, num_patches, expected_masked):
    model = tiny_mae(img_size=img_size, patch_size=patch_size)
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    pred = model(images(3, height, width), masks(3, num_patches))
    assert pred.shape == (3, expected_masked, patch_size * patch_size * 3)


def test_loss_is_zero_for_the_true_masked_patches():
    model = tiny_mae()
    imgs, mask = images(2, 64, 64), masks(2, 16)
    loss = model.forward_loss(imgs, masked_targets(imgs, mask, 16), mask)
    assert loss.item() == 0.0


def test_loss_is_the_mean_squared_error_on_masked_patches():
    model = tiny_mae()
    imgs, mask = images(2, 64, 64), masks(2, 16)
    pred = torch.randn(2, 12, 768, generator=torch.Generator().manual_seed(3))
    expected = ((pred - masked_targets(imgs, mask, 16)) ** 2).mean()
    torch.testing.assert_close(model.forward_loss(imgs, pred, mask), expected)


def test_norm_pix_loss_normalizes_each_target_patch():
    model = tiny_mae(norm_pix_loss=True)
    imgs, mask = images(2, 64, 64) * 3 + 1, masks(2, 16)
    target = masked_targets(imgs, mask, 16)
    n = target.shape[-1]
    mean = target.sum(dim=-1, keepdim=True) / n
    var_unbiased = ((target - mean) ** 2).sum(dim=-1, keepdim=True) / (n - 1)
    normalized = (target - mean) / (var_unbiased + 1e-6) ** 0.5
    pred = torch.randn(2, 12, 768, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(model.forward_loss(imgs, pred, mask), ((pred - normalized) ** 2).mean())


def test_predictions_depend_only_on_visible_pixels():
    model = tiny_mae()
    imgs, mask = images(2, 64, 64), masks(2, 16)
    changed = imgs.clone()
    noise = images(2, 64, 64, seed=9)
    for b in range(2):
        for k in mask[b].nonzero().flatten().tolist():
            r, c = divmod(k, 4)
            window = (b, slice(None), slice(16 * r, 16 * r + 16), slice(16 * c, 16 * c + 16))
            changed[window] = noise[window] * 5
    with torch.no_grad():
        torch.testing.assert_close(model(changed, mask), model(imgs, mask), atol=1e-6, rtol=0)


def test_decoder_matches_the_official_unshuffled_layout():
    # Official MAE: visible tokens and mask tokens put back in patch order, then the decoder.
    model = tiny_mae()
    imgs, mask = images(2, 64, 64), masks(2, 16)
    with torch.no_grad():
        visible_idx, _ = split_indices(mask, 12)
        x = model.decoder_embed(model.forward_encoder(imgs, visible_idx))  # (B, 1 + 4, Dd)
        tokens = model.mask_token.expand(2, 16, -1).clone()  # (B, N, Dd)
        for b in range(2):
            tokens[b, ~mask[b]] = x[b, 1:]
        x = torch.cat([x[:, :1], tokens], dim=1) + model.decoder_pos_embed
        x = model.decoder_pred(model.decoder_norm(model.decoder_blocks(x)))[:, 1:]  # (B, N, p*p*C)
        expected = torch.stack([x[b][mask[b]] for b in range(2)])
        torch.testing.assert_close(model(imgs, mask), expected, atol=1e-5, rtol=0)


def test_visible_patch_embedding_equals_timm_patch_embed_convolution():
    # The official MAE convolves the whole image, then drops the masked tokens; ours embeds only
    # the visible pixels. Values and weight gradients must agree with timm's PatchEmbed.
    model = tiny_mae()
    imgs, mask = images(2, 64, 64), masks(2, 16)
    visible_idx, _ = split_indices(mask, 12)
    ours = model.embed_visible(imgs, visible_idx)  # (B, 4, D)
    ours.square().sum().backward()
    ours_grad = model.patch_embed.proj.weight.grad.clone()
    model.zero_grad()
    full = model.patch_embed(imgs)  # (B, 16, D), timm's Conv2d
    conv = torch.stack([full[b][~mask[b]] for b in range(2)])  # (B, 4, D), patch order
    conv.square().sum().backward()
    torch.testing.assert_close(ours, conv, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_grad, model.patch_embed.proj.weight.grad, atol=1e-4, rtol=1e-5)


def test_images_of_another_size_are_refused_with_the_size_to_build():
    with pytest.raises(ValueError, match="img_size=96"):
        tiny_mae()(images(1, 96, 96), masks(1, 36))


def test_encoder_cost_follows_the_visible_tokens():
    # The real tiny encoder (12 blocks) at 224 px: 49 + 1 tokens instead of 196 + 1.
    torch.manual_seed(0)
    model = timm.create_model("pretrain_mae_tiny_patch16_224").eval()
    imgs = images(1, 224, 224)

    def encoder_flops(mask_ratio):
        mask = masks(1, 196, mask_ratio)
        visible_idx, _ = split_indices(mask, int(mask[0].sum()))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.forward_encoder(imgs, visible_idx)
        return counter.get_total_flops()

    assert encoder_flops(0.75) < 0.3 * encoder_flops(0.0)


def test_encoder_weights_reproduce_timm_vit_features():
    model = tiny_mae()
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, global_pool="token", img_size=64, depth=2
    ).eval()
    encoder_state = {name: value for name, value in model.state_dict().items() if name in vit.state_dict()}
    vit.load_state_dict(encoder_state, strict=True)
    imgs = images(2, 64, 64)
    all_visible = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_encoder(imgs, all_visible), vit.forward_features(imgs), atol=1e-5, rtol=0
        )


# --------------------------------------------------------------------------- initialization


@pytest.fixture(scope="module")
def wide_mae():
    """Base widths (768 / 512) so that token statistics are meaningful, one block each."""
    torch.manual_seed(0)
    return PretrainVisionTransformer(
        img_size=32, patch_size=16, embed_dim=768, depth=1, num_heads=12,
        decoder_embed_dim=512, decoder_depth=1, decoder_num_heads=16,
    )


def xavier_bound(fan_out, fan_in):
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_linear_weights_are_xavier_uniform(wide_mae):
    linears = [m for m in wide_mae.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 10  # 4 per block, decoder_embed, decoder_pred
    for linear in linears:
        bound = xavier_bound(*linear.weight.shape)
        largest = linear.weight.abs().max().item()
        assert 0.99 * bound < largest <= bound


def test_linear_biases_are_zero(wide_mae):
    for module in wide_mae.modules():
        if isinstance(module, torch.nn.Linear):
            assert not module.bias.any()


def test_patch_embedding_is_xavier_uniform_as_a_matrix(wide_mae):
    weight = wide_mae.patch_embed.proj.weight  # (768, 3, 16, 16) seen as (768, 768)
    bound = xavier_bound(768, 3 * 16 * 16)
    assert 0.99 * bound < weight.abs().max().item() <= bound
    assert not wide_mae.patch_embed.proj.bias.any()


@pytest.mark.parametrize("name", ["cls_token", "mask_token"])
def test_tokens_start_at_std_002(wide_mae, name):
    std = getattr(wide_mae, name).std().item()
    assert 0.017 < std < 0.023


def test_layer_norms_use_eps_1e6(wide_mae):
    norms = [m for m in wide_mae.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 6  # 2 per block, norm, decoder_norm
    assert all(norm.eps == 1e-6 for norm in norms)


def gradients(model: torch.nn.Module, loss_of) -> dict:
    model.zero_grad()
    torch.manual_seed(3)  # the same drop-path draws in both runs
    loss = loss_of(model)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), **grads}


@pytest.mark.parametrize("stage", ["pretraining", "finetuning"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(stage):
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 32, 32)  # (B, 3, H, W)
    if stage == "pretraining":
        model = timm.create_model("pretrain_mae_tiny_patch16_224", img_size=32, depth=3, drop_path_rate=0.2)
        mask = random_masks(2, 4, 0.75)

        def loss_of(m):
            return m.forward_loss(imgs, m(imgs, mask), mask)
    else:
        model = create_finetune_model("vit_tiny_patch16_224", 5, img_size=32, drop_path_rate=0.2, depth=3)

        def loss_of(m):
            return m(imgs).logsumexp(dim=1).mean()
    model.train()
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))  # (the recompute stops early)
    plain = gradients(model, loss_of)
    model.set_grad_checkpointing(True)
    recomputed = gradients(model, loss_of)
    assert len(calls) == 3  # once, then once more and again in the backward pass: recomputed
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=0, msg=name)
