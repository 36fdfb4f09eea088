"""Pictures of an MAE: ``python run_mae_vis.py IMAGE_PATH OUTPUT_DIR --model_path CKPT [--show WHAT]``.

IMAGE_PATH is an image, a folder of images (one picture each) or the word ``synthetic`` (one
picture of ``--num_images`` validation images). ``--show reconstruction`` (the default): each row
shows original | masked input | reconstruction | reconstruction with the visible patches pasted
back, for ``--mask_ratio`` and a mask drawn from ``--seed``. ``--show pca``: original | the first
three principal components of the encoder's patch tokens as RGB, every patch visible.
``--show attention``: original | the image dimmed where the cls token's mean attention in the last
block is low | each head's attention. Model, input size, normalization and ``norm_pix_loss`` come
from the checkpoint's args when it has them (ours do; official MAE checkpoints need ``--model`` and,
for norm-pixel models, ``--norm_pix_loss``); pca and attention need no decoder.
"""
import argparse
import textwrap
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Tuple

import timm
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from modeling_pretrain import load_mae_weights  # and the pretrain_mae_* models, registered with timm
import utils
from image_data.augmentation import eval_transform, normalize_on_device
from training.config_file import ConfigArgumentParser
from training.hub import resolve_checkpoint
from training.weight_files import read_weights
from training.cli import check_model_name, check_patch_grid, patch_size_kwargs
from training.config import resolve_visualization
from image_data.files import UNREADABLE, find_images, load_image
from masking_generator import random_masks
from image_data.geometry import to_grid
from image_data.synthetic import synthetic_split
from visualization import (
    ATTENTION_PANELS,
    PANELS,
    PCA_PANELS,
    attention_grid,
    channels_note,
    feature_grid,
    reconstruction_grid,
)

NORM_PIX_NOTE = "norm_pix_loss: masked patches shown with their true mean/std"
SHOWS = ("reconstruction", "pca", "attention")
CAPTION_LINE = 12  # pixels per caption line with PIL's default font


def get_args_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser("MAE reconstruction pictures", add_help=True)
    parser.add_argument("image_path", help="an image, a folder of images, or 'synthetic'")
    parser.add_argument("output_dir", help="where the PNG pictures go")
    parser.add_argument("--model_path", required=True,
                        help="pretraining checkpoint with the decoder: ours, official, sharded or a Hugging Face folder")
    parser.add_argument("--model", default=None, help="default: the checkpoint's, else pretrain_mae_base_patch16_224")
    parser.add_argument("--input_size", default=None, type=int, nargs="+", metavar="SIZE",
                        help="one value for a square, or H W (default: the checkpoint's, else 224)")
    parser.add_argument("--in_chans", default=None, type=int, help="image channels (default: the checkpoint's, else 3)")
    parser.add_argument("--patch_size", default=None, type=int, help="default: the checkpoint's, else the model's")
    parser.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                        help="whether the model predicts per-patch normalized pixels (default: the checkpoint's)")
    parser.add_argument("--mask_ratio", default=0.75, type=float, help="share of patches hidden from the encoder")
    parser.add_argument("--seed", default=0, type=int, help="seed of the random masks")
    parser.add_argument("--num_images", default=8, type=int, help="rows of the synthetic picture")
    parser.add_argument("--show", default="reconstruction", choices=SHOWS,
                        help="reconstruction: what the decoder makes of the masked image; pca: the encoder's patch "
                             "features as RGB; attention: where the cls token looks in the last block")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def load_model(args: argparse.Namespace, checkpoint: Mapping[str, Any]) -> torch.nn.Module:
    """The MAE of ``--model`` at ``--input_size`` with the checkpoint's weights, decoder included."""
    check_model_name(args.model, "pretrain_mae_*")
    model = timm.create_model(args.model, img_size=to_grid(args.input_size), in_chans=args.in_chans,
                              norm_pix_loss=args.norm_pix_loss, **patch_size_kwargs(args.patch_size))
    check_patch_grid(model, args.input_size)
    load_mae_weights(model, checkpoint, source=f"--model_path {args.model_path} (--model {args.model})",
                     decoder_required=args.show == "reconstruction")
    return model.to(args.device).eval()


def image_batches(args: argparse.Namespace) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, (B, C, H, W) normalized images): one per image file, or one synthetic batch; each
    image resized (keeping its aspect ratio) and center-cropped to ``--input_size``."""
    resize_and_crop = eval_transform(args.input_size, args.in_chans, crop_pct=1.0)

    def transform(image) -> torch.Tensor:
        return normalize_on_device(resize_and_crop(image)[None], args.mean, args.std)  # (1, C, H, W)

    if args.image_path == "synthetic":
        if args.in_chans != 3:
            raise utils.UsageError(f"the synthetic images are RGB; the model takes {args.in_chans} channel(s): give "
                                   "an image or a folder")
        dataset = synthetic_split("val", max(to_grid(args.input_size)), args.num_images, transform)
        yield "synthetic", torch.cat([dataset[i][0] for i in range(len(dataset))])
        return
    path = Path(args.image_path)
    paths = [str(path)] if path.is_file() else find_images(str(path)) if path.is_dir() else []
    if not paths:
        raise utils.UsageError(f"{args.image_path} is no image, no folder with images and not 'synthetic'")
    for image_path in paths:
        try:
            image = load_image(image_path, args.in_chans)
        except UNREADABLE as error:
            raise utils.UsageError(f"cannot read {image_path}: {error}") from error
        yield Path(image_path).stem, transform(image)


def caption_lines(args: argparse.Namespace, width: int) -> List[str]:
    """What the picture shows, wrapped to its width (about 6 pixels per character)."""
    if args.show == "reconstruction":
        text = [" | ".join(PANELS), f"mask ratio {args.mask_ratio:g}, seed {args.seed}, {args.model}"]
    else:
        text = [" | ".join(PCA_PANELS if args.show == "pca" else ATTENTION_PANELS), f"every patch visible, {args.model}"]
    if channels_note(args.in_chans):
        text.append(channels_note(args.in_chans))
    if args.norm_pix_loss and args.show == "reconstruction":
        text.append(NORM_PIX_NOTE)
    columns = max(width // 6, 20)
    return [line for paragraph in text for line in textwrap.wrap(paragraph, columns)]


def captioned(grid: torch.Tensor, lines: List[str]) -> Image.Image:
    """The ``(3, H, W)`` grid in [0, 1] as an image under a white strip with ``lines``."""
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()  # (H, W, 3)
    strip = CAPTION_LINE * len(lines) + 4
    canvas = Image.new("RGB", (pixels.shape[1], pixels.shape[0] + strip), "white")
    canvas.paste(Image.fromarray(pixels), (0, strip))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=10)
    for row, line in enumerate(lines):
        draw.text((2, 2 + CAPTION_LINE * row), line, fill="black", font=font)
    return canvas


def save_picture(image: Image.Image, lines: List[str], path: Path) -> None:
    """PNG with the caption also as a text chunk, written atomically."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", "\n".join(lines))
    with utils.atomic_write(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def main(args: argparse.Namespace) -> List[Path]:
    """Write one picture per image (one for the synthetic batch); returns their paths."""
    checkpoint = read_weights(Path(resolve_checkpoint(args.model_path, "--model_path")))
    checkpoint_args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    args = resolve_visualization(args, checkpoint_args)
    model = load_model(args, checkpoint)
    batches = list(image_batches(args))  # every input read before anything is written
    utils.check_writable_dir(args.output_dir, "OUTPUT_DIR")
    written = []
    for name, imgs in batches:
        imgs = imgs.to(args.device)
        if args.show == "reconstruction":
            generator = torch.Generator(args.device).manual_seed(args.seed)
            mask = random_masks(imgs.shape[0], model.patch_embed.num_patches, args.mask_ratio, args.device, generator)
            grid = reconstruction_grid(model, imgs, mask, args.mean, args.std)
            path = Path(args.output_dir) / f"{name}_mask{args.mask_ratio:g}_seed{args.seed}.png"
        else:
            draw = feature_grid if args.show == "pca" else attention_grid
            grid = draw(model, imgs, args.mean, args.std)
            path = Path(args.output_dir) / f"{name}_{args.show}.png"
        lines = caption_lines(args, grid.shape[-1])
        save_picture(captioned(grid, lines), lines, path)
        written.append(path)
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    utils.exit_on_usage_error(main, get_args_parser().parse_args())
