"""Pictures of MAE reconstructions: original | masked input | reconstruction | pasted; pictures of
what the encoder's features see, every patch visible: the first three principal components of its
patch tokens as RGB (``features.png``, as DINOv2 shows features) and the cls token's attention in
the last block; and the fixed batch pretraining draws after every epoch, so that successive
pictures compare. Images of more than three channels show their first three, of one or two their
first (``shown_channels``)."""
import math
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image

from image_data.augmentation import normalize_on_device
from image_data.device_decoder import batch_images
from masking_generator import random_masks
from modeling_pretrain import PretrainVisionTransformer
from training.wrapping import is_sharded
from utils import atomic_write, is_main_process

PANELS = ("original", "masked input", "reconstruction", "reconstruction + visible")
PCA_PANELS = ("original", "patch features: first three principal components as RGB")
ATTENTION_PANELS = ("original", "image x mean attention of the cls token (last block)", "each head's attention")
NUM_PICTURES = 8  # rows of pretraining's reconstruction.png


def denormalize(imgs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the input normalization and clamp to displayable [0, 1]."""
    mean_t = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    return (imgs * std_t + mean_t).clamp(0.0, 1.0)


def shown_channels(imgs: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> what a picture can show: the first three channels, or the first one."""
    return imgs[:, :3] if imgs.shape[1] >= 3 else imgs[:, :1]


def channels_note(in_chans: int) -> str:
    """What a picture of ``in_chans`` channels shows, for its caption ('' for RGB)."""
    if in_chans == 3:
        return ""
    if in_chans > 3:
        return f"channels 1-3 of {in_chans} shown as RGB"
    return "grayscale" if in_chans == 1 else f"channel 1 of {in_chans} shown"


def mask_to_pixels(model: PretrainVisionTransformer, mask: torch.Tensor) -> torch.Tensor:
    """(B, N) patch mask -> (B, 1, H, W) pixel mask, 1 where the patch was hidden."""
    patch_dim = model.patch_size**2
    patches = mask.float().unsqueeze(-1).expand(-1, -1, patch_dim)  # (B, N, p*p)
    return model.unpatchify(patches)  # (B, 1, H, W)


@torch.no_grad()
def reconstruction_grid(
    model: PretrainVisionTransformer,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """One row per image with the four ``PANELS``: (3, H_grid, W_grid) in [0, 1]."""
    was_training = model.training
    model.eval()
    recon, pasted = model.reconstruct(imgs, mask)
    model.train(was_training)
    original = denormalize(imgs.float(), mean, std)
    hidden = mask_to_pixels(model, mask)  # (B, 1, H, W)
    masked_input = original * (1 - hidden) + 0.5 * hidden  # hidden patches shown grey
    panels = [original, masked_input, denormalize(recon, mean, std), denormalize(pasted, mean, std)]
    rows = torch.stack([shown_channels(panel) for panel in panels], dim=1).flatten(0, 1)  # (B * 4, 3 or 1, H, W)
    return make_grid(rows.cpu(), nrow=len(PANELS), padding=2, pad_value=1.0)


def patch_pca(tokens: torch.Tensor, components: int = 3) -> torch.Tensor:
    """(B, N, D) patch features -> (B, N, ``components``): their coordinates on the first principal
    components of all B * N tokens together, each component's sign set so that its largest
    coordinate is positive, and scaled to [0, 1] over the batch."""
    flat = tokens.reshape(-1, tokens.shape[-1]).double()  # (B * N, D)
    centred = flat - flat.mean(dim=0)
    _, _, directions = torch.linalg.svd(centred, full_matrices=False)  # (min(B * N, D), D), by variance
    coords = centred @ directions[:components].T  # (B * N, k)
    largest = coords.gather(0, coords.abs().argmax(dim=0, keepdim=True))  # (1, k)
    coords = coords * largest.sign()
    low, high = coords.min(dim=0).values, coords.max(dim=0).values
    return ((coords - low) / (high - low).clamp_min(1e-12)).float().view(*tokens.shape[:2], components)


def patch_maps(model: PretrainVisionTransformer, values: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, N, K) per-patch values -> (B, K, H, W) pictures, each patch a block of its value."""
    rows, cols = model.patch_embed.grid_size
    maps = values.transpose(1, 2).reshape(values.shape[0], values.shape[2], rows, cols)  # (B, K, h, w)
    return F.interpolate(maps, size=tuple(size), mode="nearest")


def as_rgb(imgs: torch.Tensor) -> torch.Tensor:
    """What ``shown_channels`` shows, as three channels: (B, 3, H, W)."""
    shown = shown_channels(imgs)
    return shown.expand(-1, 3, -1, -1) if shown.shape[1] == 1 else shown


@torch.no_grad()
def feature_grid(model: PretrainVisionTransformer, imgs: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float]) -> torch.Tensor:
    """One row per image: original | ``patch_pca`` of its patch tokens as RGB: (3, H_grid, W_grid)."""
    was_training = model.training
    model.eval()
    tokens = model.encode(imgs)[:, 1:]  # (B, N, D), the cls token left out
    model.train(was_training)
    pca = patch_maps(model, patch_pca(tokens), imgs.shape[-2:])  # (B, 3, H, W)
    rows = torch.stack([as_rgb(denormalize(imgs.float(), mean, std)), pca.to(imgs.device)], dim=1)
    return make_grid(rows.flatten(0, 1).cpu(), nrow=len(PCA_PANELS), padding=2, pad_value=1.0)


@torch.no_grad()
def cls_attention(model: PretrainVisionTransformer, imgs: torch.Tensor) -> torch.Tensor:
    """How the cls token attends to each patch in the encoder's last block, every patch visible:
    (B, C, H, W) -> (B, heads, N), each head's row summing to 1 less its weight on the cls token
    itself; timm's ``Attention`` written out (its fused path keeps no weights)."""
    x = model.encoder_tokens(imgs, model.every_patch(imgs))  # (B, 1 + N, D)
    for block in model.blocks[:-1]:
        x = block(x)
    last = model.blocks[-1]
    attn = last.attn
    batch, tokens, _ = x.shape
    qkv = attn.qkv(last.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)  # (B, T, 3, h, hd)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, T, hd) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)  # (B, h, T, T)
    return weights[:, :, 0, 1:]  # (B, h, N): the cls token's row, patches only


@torch.no_grad()
def attention_grid(model: PretrainVisionTransformer, imgs: torch.Tensor, mean: Sequence[float],
                   std: Sequence[float]) -> torch.Tensor:
    """One row per image: original | the image dimmed where the heads' mean attention is low | each
    head's map (white where it attends most), each map scaled to [0, 1]: (3, H_grid, W_grid)."""
    was_training = model.training
    model.eval()
    weights = cls_attention(model, imgs)  # (B, h, N)
    model.train(was_training)
    maps = torch.cat([weights.mean(dim=1, keepdim=True), weights], dim=1)  # (B, 1 + h, N)
    low, high = maps.amin(dim=-1, keepdim=True), maps.amax(dim=-1, keepdim=True)
    maps = patch_maps(model, ((maps - low) / (high - low).clamp_min(1e-12)).transpose(1, 2), imgs.shape[-2:])
    original = as_rgb(denormalize(imgs.float(), mean, std))  # (B, 3, H, W)
    maps = maps.to(original.device)
    heads = maps[:, 1:].unsqueeze(2).expand(-1, -1, 3, -1, -1)  # (B, h, 3, H, W)
    rows = torch.cat([original.unsqueeze(1), (original * maps[:, :1]).unsqueeze(1), heads], dim=1)
    return make_grid(rows.flatten(0, 1).cpu(), nrow=rows.shape[1], padding=2, pad_value=1.0)


def save_png(grid: torch.Tensor, path: Path) -> None:
    """Write the picture atomically, so readers never see half a PNG."""
    with atomic_write(path) as tmp:
        save_image(grid, tmp, format="PNG")


class PictureBatch(NamedTuple):
    """The images and masks pretraining reconstructs after every epoch."""

    imgs: torch.Tensor  # (B, 3, H, W) normalized, on the training device
    masks: torch.Tensor  # (B, N) bool


def picture_batch(
    loader: DataLoader, device: torch.device, *, num_patches: int, mean: Sequence[float], std: Sequence[float],
    mask_ratio: float, seed: int,
) -> PictureBatch:
    """The loader's first images as epoch 0 crops them, normalized, with masks drawn from ``seed``."""
    samples = [loader.dataset[(i, 0)] for i in range(min(NUM_PICTURES, len(loader.dataset)))]  # (index, epoch) keys
    imgs = normalize_on_device(batch_images(loader.collate_fn(samples), device), mean, std)
    generator = torch.Generator().manual_seed(seed)
    masks = random_masks(len(samples), num_patches, mask_ratio, generator=generator)  # (B, N)
    return PictureBatch(imgs, masks.to(device))


def write_pictures(
    model: PretrainVisionTransformer, pictures: PictureBatch, *, mean: Sequence[float], std: Sequence[float],
    output_dir: Optional[str], log_writer: Optional[Any], epoch: int,
) -> None:
    """``reconstruction.png`` and ``features.png`` in output_dir (latest) and image series in
    TensorBoard. Every rank draws a sharded model's (it gathers each block's weights from all of
    them); rank 0 writes."""
    if not (is_main_process() or is_sharded(model)):
        return
    grids = {"reconstruction": reconstruction_grid(model, pictures.imgs, pictures.masks, mean, std),
             "features": feature_grid(model, pictures.imgs, mean, std)}
    if not is_main_process():
        return
    for name, grid in grids.items():
        if output_dir:
            save_png(grid, Path(output_dir) / f"{name}.png")
        if log_writer is not None:
            log_writer.add_image(name, grid, epoch)


CHART_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def line_chart(series: Dict[str, Sequence[Tuple[float, float]]], *, x_label: str, y_label: str, title: str,
               path: Path, size: Tuple[int, int] = (480, 320)) -> None:
    """A PNG of one line per named series of (x, y) points, with marked points, axis ticks at the
    points' x values and at round y values, and a legend (results figures, without matplotlib)."""
    width, height = size
    left, right, top, bottom = 52, 16, 28, 40
    xs = sorted({x for points in series.values() for x, _ in points})
    ys = [y for points in series.values() for _, y in points]
    y_low, y_high = math.floor(min(ys) / 5) * 5, math.ceil(max(ys) / 5) * 5 + (5 if min(ys) == max(ys) else 0)
    x_low, x_high = xs[0], xs[-1] if xs[-1] > xs[0] else xs[0] + 1

    def at(x: float, y: float) -> Tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * (width - left - right),
                height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom))

    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)
    draw.text((left, 6), title, fill="black", font=font)
    draw.line([at(x_low, y_low), at(x_high, y_low)], fill="black")
    draw.line([at(x_low, y_low), at(x_low, y_high)], fill="black")
    for x in xs:
        px, py = at(x, y_low)
        draw.line([(px, py), (px, py + 4)], fill="black")
        draw.text((px - 8, py + 6), f"{x:g}", fill="black", font=font)
    for y in range(int(y_low), int(y_high) + 1, 5 if y_high - y_low <= 40 else 10):
        px, py = at(x_low, y)
        draw.line([(px - 4, py), (px, py)], fill="black")
        draw.text((6, py - 6), f"{y:g}", fill="black", font=font)
    draw.text(((width - left) // 2, height - 16), x_label, fill="black", font=font)
    draw.text((6, top - 14), y_label, fill="black", font=font)
    for index, (name, points) in enumerate(series.items()):
        colour = CHART_COLOURS[index % len(CHART_COLOURS)]
        corners = [at(x, y) for x, y in sorted(points)]
        if len(corners) > 1:
            draw.line(corners, fill=colour, width=2)
        for px, py in corners:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((width - 150, top + 14 * index), f"- {name}", fill=colour, font=font)
    with atomic_write(path) as tmp:
        canvas.save(tmp, format="PNG")
