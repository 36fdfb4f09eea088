"""The FLOPs a training step spends per image, counted from the model's own layers, for the MFU
curve (``training.progress``): every matmul of a linear layer (2 x tokens x in x out), the
attention's two (4 x tokens^2 x width per block), the patch embedding; the backward pass costs
twice the forward. Checked against ``torch.utils.flop_counter`` in the tests."""
from typing import Iterable

from torch import nn

BACKWARD_FACTOR = 2  # the gradients of the inputs and of the weights: one forward's matmuls each


def linear_flops(layers: Iterable[nn.Module], tokens: int) -> float:
    """Forward FLOPs of every ``nn.Linear`` in ``layers`` applied to ``tokens`` tokens."""
    return float(sum(2 * tokens * m.in_features * m.out_features
                     for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)))


def block_flops(blocks: Iterable[nn.Module], tokens: int) -> float:
    """Forward FLOPs of timm transformer blocks on ``tokens`` tokens: their linear layers, and
    attention's scores and weighted sum (``q @ k^T`` and ``attn @ v``, 2 x tokens^2 x width each)."""
    blocks = list(blocks)
    attention = sum(4 * tokens**2 * block.attn.qkv.out_features // 3 for block in blocks)
    return linear_flops(blocks, tokens) + attention


def patch_embed_flops(patch_embed: nn.Module, patches: int) -> float:
    """Forward FLOPs of the patch embedding (a strided convolution: one matmul per patch)."""
    return float(2 * patches * patch_embed.proj.weight.numel())


def mae_train_flops(model: nn.Module, num_masked: int) -> float:
    """One image's training FLOPs for MAE: the encoder on the visible patches and cls, the decoder
    on every patch and cls, the prediction of the masked patches (the patch embedding's input needs
    no gradient, so its backward is the weights' alone)."""
    num_patches = model.patch_embed.num_patches
    visible = num_patches - num_masked
    embed = patch_embed_flops(model.patch_embed, visible)
    rest = (block_flops(model.blocks, 1 + visible) + linear_flops([model.decoder_embed], 1 + visible)
            + block_flops(model.decoder_blocks, 1 + num_patches) + linear_flops([model.decoder_pred], num_masked))
    return 2 * embed + (1 + BACKWARD_FACTOR) * rest


def vit_train_flops(model: nn.Module) -> float:
    """One image's training FLOPs for a timm ViT classifier on every patch, or for the linear probe
    (its ``encoder`` frozen: forward only, and its ``head`` trained)."""
    vit = getattr(model, "encoder", model)
    num_patches = vit.patch_embed.num_patches
    tokens = num_patches + getattr(vit, "num_prefix_tokens", 1)
    encoder = patch_embed_flops(vit.patch_embed, num_patches) + block_flops(vit.blocks, tokens)
    head = linear_flops([model.head], 1)
    trained = any(p.requires_grad for p in vit.blocks.parameters())
    return (1 + BACKWARD_FACTOR) * (encoder + head) if trained else encoder + (1 + BACKWARD_FACTOR) * head
