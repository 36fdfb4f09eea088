"""The MAE pretraining model: timm's ViT as the encoder, run on visible patches only, plus a
light decoder that reconstructs the masked patches.

``PretrainVisionTransformer`` *is* timm's ``VisionTransformer`` (the encoder, with the
official MAE parameter names) extended with the decoder, so its encoder weights load
unchanged into ``timm.create_model('vit_base_patch16_224')`` for finetuning, and an official
MAE checkpoint loads into it with ``strict=True``.
"""
from functools import partial
from typing import Any, Callable, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.models import checkpoint_seq, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from image_data.geometry import to_grid
from modeling_finetune import is_decoder_key, model_kwargs, state_mismatch, unwrap_state_dict
from utils import UsageError


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[sin | cos]`` of ``positions`` at frequencies ``1 / 10000^(i / (embed_dim / 2))``."""
    if embed_dim % 2:
        raise ValueError(f"sine-cosine embedding needs an even width, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)  # (M, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (M, D)


def sincos_2d_pos_embed(
    embed_dim: int, grid_size: Union[int, Tuple[int, int]], cls_token: bool = False
) -> torch.Tensor:
    """The official MAE 2-D table, row-major over patches: the first half of the channels
    encodes the column (x) index, the second half the row (y) index. Computed in float64 as the
    official NumPy code is, then rounded to float32. With ``cls_token`` a zero row comes first.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sine-cosine embedding needs a width divisible by 4, got {embed_dim}")
    height, width = to_grid(grid_size)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")  # (H, W) each
    table = torch.cat(
        [sincos_1d(embed_dim // 2, cols.flatten()), sincos_1d(embed_dim // 2, rows.flatten())], dim=1
    )  # (H*W, D)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=table.dtype), table], dim=0)  # (1+H*W, D)
    return table.float()


def fixed_pos_embed(embed_dim: int, grid_size: Tuple[int, int]) -> nn.Parameter:
    """A frozen parameter (so it lives in the state dict and can be resampled) with a cls row."""
    table = sincos_2d_pos_embed(embed_dim, grid_size, cls_token=True).unsqueeze(0)  # (1, 1+N, D)
    return nn.Parameter(table, requires_grad=False)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick ``index`` (B, K) rows from ``tokens`` (B, N, D) -> (B, K, D)."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def split_indices(mask: torch.Tensor, num_masked: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Patch indices of the visible and of the masked patches, each ascending.

    A stable sort of the 0/1 mask puts visible patches first, both parts in index order, without
    the host synchronisation that boolean indexing costs.
    """
    order = mask.to(torch.uint8).argsort(dim=1, stable=True)  # (B, N)
    num_visible = mask.shape[1] - num_masked
    return order[:, :num_visible], order[:, num_visible:]  # (B, N_vis), (B, N_mask)


class PretrainVisionTransformer(VisionTransformer):
    """Masked autoencoder with a ViT encoder (He et al., 2021).

    Args:
        img_size: Input size, an int or ``(height, width)``.
        patch_size: Patch side in pixels.
        in_chans: Image channels.
        embed_dim, depth, num_heads: Encoder width, blocks and attention heads.
        decoder_embed_dim, decoder_depth, decoder_num_heads: The same for the decoder.
        mlp_ratio: MLP hidden width over token width in the encoder.
        decoder_mlp_ratio: The same in the decoder (the paper's 4 for every encoder).
        norm_layer: Normalization of every block and of both final norms.
        norm_pix_loss: Regress each patch normalized by its own mean and variance.
        **vit_kwargs: Further keywords for timm's ``VisionTransformer`` (e.g. ``drop_path_rate``).
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        decoder_mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        norm_pix_loss: bool = False,
        **vit_kwargs: Any,
    ) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            norm_layer=norm_layer,
            weight_init="skip",
            **vit_kwargs,
        )
        self.patch_size = patch_size
        self.norm_pix_loss = norm_pix_loss
        grid = self.patch_embed.grid_size
        self.pos_embed = fixed_pos_embed(embed_dim, grid)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = fixed_pos_embed(decoder_embed_dim, grid)
        self.decoder_blocks = nn.Sequential(
            *[
                Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official MAE initialization (xavier-uniform everywhere, tokens at std 0.02)."""
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))  # conv seen as (D, C*p*p)
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token", "mask_token", "decoder_pos_embed"}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), pixels of a patch in the official (p, q, c) order."""
        p = self.patch_size
        return rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W), the inverse of ``patchify`` on this model's grid."""
        p = self.patch_size
        h, w = self.patch_embed.grid_size
        return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)

    def embed_visible(self, imgs: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
        """Embed only the visible patches: (B, C, H, W) -> (B, N_vis, D), without position.

        The patch embedding is a convolution whose stride is its kernel, one matrix product per
        patch, so applying ``patch_embed.proj`` as a matrix to the gathered visible pixels gives
        what convolving the whole image and dropping the masked 75% gives, for a quarter of the
        work (forward and weight gradient) and without the convolution's layout conversions.
        """
        size = tuple(imgs.shape[-2:])
        if size != tuple(self.patch_embed.img_size):
            fitting = size[0] if size[0] == size[1] else size
            raise ValueError(
                f"images are {size} pixels but the model was built for "
                f"{tuple(self.patch_embed.img_size)}; resize them or build it with img_size={fitting}"
            )
        p = self.patch_size
        pixels = rearrange(imgs, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)  # (B, N, C*p*p), conv order
        pixels = gather_tokens(pixels, visible_idx)  # (B, N_vis, C*p*p)
        proj = self.patch_embed.proj
        return F.linear(pixels, proj.weight.flatten(1), proj.bias)  # (B, N_vis, D)

    def encoder_tokens(self, imgs: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
        """The encoder's input: the visible patches with their positions after the cls token,
        (B, C, H, W) -> (B, 1 + N_vis, D)."""
        patch_pos = self.pos_embed[:, 1:].expand(imgs.shape[0], -1, -1)  # (B, N, D)
        x = self.embed_visible(imgs, visible_idx) + gather_tokens(patch_pos, visible_idx)  # (B, N_vis, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1)  # (B, 1 + N_vis, D)

    def forward_encoder(self, imgs: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
        """Encode only the visible patches: (B, C, H, W) -> (B, 1 + N_vis, D), cls first."""
        x = self.run_blocks(self.blocks, self.encoder_tokens(imgs, visible_idx))
        return self.norm(x)

    def every_patch(self, imgs: torch.Tensor) -> torch.Tensor:
        """Indices that leave every patch visible, in patch order: (B, N)."""
        return torch.arange(self.patch_embed.num_patches, device=imgs.device).expand(imgs.shape[0], -1)

    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder with every patch visible, as a finetuned ViT sees the image (features,
        evaluation during pretraining): (B, C, H, W) -> (B, 1 + N, D), cls first, in patch order."""
        return self.forward_encoder(imgs, self.every_patch(imgs))

    def run_blocks(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """``blocks(x)``; with ``set_grad_checkpointing()`` each block's activations are recomputed in
        the backward pass instead of kept (timm's ``checkpoint_seq``, as its own ViT does)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_seq(blocks, x)
        return blocks(x)

    def forward_decoder(
        self, latent: torch.Tensor, visible_idx: torch.Tensor, masked_idx: torch.Tensor, predict_visible: bool = False
    ) -> torch.Tensor:
        """Reconstruct the masked patches: (B, 1 + N_vis, D) -> (B, N_mask, p*p*C).

        Attention is permutation-equivariant and every token carries its position embedding,
        so laying tokens out as (cls, visible, masked) gives the same outputs as the official
        unshuffled order, and only the masked outputs go through ``decoder_pred``. With
        ``predict_visible`` (for pictures) every patch is predicted: (B, N, p*p*C) in
        (visible, masked) order.
        """
        x = self.decoder_embed(latent)  # (B, 1 + N_vis, Dd)
        batch = x.shape[0]
        patch_pos = self.decoder_pos_embed[:, 1:].expand(batch, -1, -1)  # (B, N, Dd)
        cls = x[:, :1] + self.decoder_pos_embed[:, :1]  # (B, 1, Dd)
        visible = x[:, 1:] + gather_tokens(patch_pos, visible_idx)  # (B, N_vis, Dd)
        masked = self.mask_token + gather_tokens(patch_pos, masked_idx)  # (B, N_mask, Dd)
        x = torch.cat([cls, visible, masked], dim=1)  # (B, 1 + N, Dd)
        x = self.run_blocks(self.decoder_blocks, x)
        num_out = x.shape[1] - 1 if predict_visible else masked_idx.shape[1]
        x = self.decoder_norm(x[:, -num_out:])  # (B, N_out, Dd)
        return self.decoder_pred(x)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor, num_masked: Optional[int] = None) -> torch.Tensor:
        """Predict the masked patches, in ascending patch order.

        Args:
            imgs: (B, C, H, W) images.
            mask: (B, N) bool, True = masked, the same count in every row.
            num_masked: That count, when the caller knows it; saves reading it back from a
                mask on the GPU, which would stall the host.
        Returns:
            (B, N_mask, patch_size**2 * in_chans) predicted pixels.
        """
        if num_masked is None:
            num_masked = int(mask[0].sum())
        visible_idx, masked_idx = split_indices(mask, num_masked)
        latent = self.forward_encoder(imgs, visible_idx)
        return self.forward_decoder(latent, visible_idx, masked_idx)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only, in float32."""
        _, masked_idx = split_indices(mask, pred.shape[1])
        target = gather_tokens(self.patchify(imgs), masked_idx).float()  # (B, N_mask, p*p*C)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return (pred.float() - target).pow(2).mean()

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pictures of what the model predicts, in the input's (normalized) pixel space.

        Returns the reconstruction of every patch and the same with the visible patches pasted
        back from the input, each (B, C, H, W). A ``norm_pix_loss`` model predicts normalized
        patches, so each is mapped back with its true patch's mean and variance.
        """
        num_masked = int(mask[0].sum())
        visible_idx, masked_idx = split_indices(mask, num_masked)
        latent = self.forward_encoder(imgs, visible_idx)
        pred = self.forward_decoder(latent, visible_idx, masked_idx, predict_visible=True).float()  # (B, N, P)
        patches = self.patchify(imgs).float()  # (B, N, P)
        order = torch.cat([visible_idx, masked_idx], dim=1).unsqueeze(-1).expand_as(pred)  # (B, N, P)
        pred = torch.empty_like(pred).scatter_(1, order, pred)  # (B, N, P) in patch order
        if self.norm_pix_loss:
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
            pred = pred * std + mean
        pasted = torch.where(mask.unsqueeze(-1), pred, patches)  # (B, N, P)
        return self.unpatchify(pred), self.unpatchify(pasted)


class MaeConfig(NamedTuple):
    """An encoder's sizes, with the paper's decoder (512 wide, 8 blocks, 16 heads) unless given."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16


MAE_CONFIGS = {
    "pretrain_mae_tiny_patch16_224": MaeConfig(192, 12, 3, 16, decoder_embed_dim=128, decoder_depth=2,
                                               decoder_num_heads=4),
    "pretrain_mae_small_patch16_224": MaeConfig(384, 12, 6, 16),
    "pretrain_mae_base_patch16_224": MaeConfig(768, 12, 12, 16),
    "pretrain_mae_large_patch16_224": MaeConfig(1024, 24, 16, 16),
    "pretrain_mae_huge_patch14_224": MaeConfig(1280, 32, 16, 14),
    # ViT-g/14 of "Scaling Vision Transformers" (Zhai et al., 2022): MLP 6144 = 1408 x 48/11, as timm's
    # vit_giant_patch14_224
    "pretrain_mae_giant_patch14_224": MaeConfig(1408, 40, 16, 14, mlp_ratio=48 / 11),
    # ViT-2B/14 of MAWS ("The effectiveness of MAE pre-pretraining for billion-scale pretraining",
    # Singh et al., 2023): MLP 10240
    "pretrain_mae_2b_patch14_224": MaeConfig(2560, 24, 32, 14),
}

def _create_mae(name: str, pretrained: bool, **kwargs: Any) -> PretrainVisionTransformer:
    config = {**MAE_CONFIGS[name]._asdict(), **model_kwargs(name, pretrained, kwargs)}
    return PretrainVisionTransformer(**config)


@register_model
def pretrain_mae_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> PretrainVisionTransformer:
    return _create_mae("pretrain_mae_tiny_patch16_224", pretrained, **kwargs)


@register_model
def pretrain_mae_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> PretrainVisionTransformer:
    return _create_mae("pretrain_mae_small_patch16_224", pretrained, **kwargs)


@register_model
def pretrain_mae_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> PretrainVisionTransformer:
    return _create_mae("pretrain_mae_base_patch16_224", pretrained, **kwargs)


@register_model
def pretrain_mae_large_patch16_224(pretrained: bool = False, **kwargs: Any) -> PretrainVisionTransformer:
    return _create_mae("pretrain_mae_large_patch16_224", pretrained, **kwargs)


@register_model
def pretrain_mae_huge_patch14_224(pretrained: bool = False, **kwargs: Any) -> PretrainVisionTransformer:
    return _create_mae("pretrain_mae_huge_patch14_224", pretrained, **kwargs)


@register_model
def pretrain_mae_giant_patch14_224(pretrained: bool = False, **kwargs: Any) -> PretrainVisionTransformer:
    return _create_mae("pretrain_mae_giant_patch14_224", pretrained, **kwargs)


@register_model
def pretrain_mae_2b_patch14_224(pretrained: bool = False, **kwargs: Any) -> PretrainVisionTransformer:
    return _create_mae("pretrain_mae_2b_patch14_224", pretrained, **kwargs)


FIXED_TABLES = ("pos_embed", "decoder_pos_embed")  # sine-cosine: the model's own fit any input size


def load_mae_weights(model: torch.nn.Module, checkpoint: Mapping[str, Any], *, source: str,
                     decoder_required: bool) -> List[str]:
    """A pretraining checkpoint's weights (whatever ``read_weights`` reads) into a
    ``PretrainVisionTransformer``, strictly; its fixed position tables stay the model's own. Without
    ``decoder_required`` an encoder-only checkpoint (MAE's released ones) leaves the decoder as
    initialized. Returns the keys left as they were."""
    own = model.state_dict()
    state = {**unwrap_state_dict(checkpoint), **{name: own[name] for name in FIXED_TABLES}}
    kept = [] if decoder_required else [key for key in own if key not in state and is_decoder_key(key)]
    state.update({key: own[key] for key in kept})
    mismatch = state_mismatch(model, state)
    if mismatch:
        hint = "is --model the architecture it was pretrained with?"
        if "decoder_pred.weight" not in state:
            hint = "it has no decoder (an encoder-only checkpoint cannot draw reconstructions)"
        raise UsageError(f"{source} does not fit the model: {mismatch}; {hint}")
    model.load_state_dict(state)
    return kept
