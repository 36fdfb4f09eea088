"""MAE pretraining: ``python run_mae_pretraining.py`` (synthetic data, any machine) up to
``torchrun --nnodes N --nproc_per_node 8 run_mae_pretraining.py --data_path /imagenet/train``.
"""
import argparse
import json
from pathlib import Path
from typing import Dict

import timm
import torch
from torch.utils.data import DataLoader

import modeling_pretrain  # noqa: F401  (registers the pretrain_mae_* models with timm)
import utils
from datasets import (
    DECODERS,
    batch_images,
    build_pretraining_dataset,
    build_train_loader,
    collate_encoded,
    normalize_on_device,
    skipped_images,
)
from engine_for_pretraining import train_one_epoch
from masking_generator import check_mask_ratio, random_masks
from optim_factory import add_optimizer_args, create_optimizer
from visualization import reconstruction_grid, save_png

NUM_PICTURES = 8


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE pretraining", add_help=True)
    parser.add_argument("--batch_size", default=64, type=int, help="images per GPU per step")
    parser.add_argument("--epochs", default=400, type=int, help="length of the schedule")
    parser.add_argument("--accum_iter", default=1, type=int, help="micro-steps per optimizer step")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="pretrain_mae_base_patch16_224", type=str, help="a pretrain_mae_* name")
    model.add_argument("--input_size", default=224, type=int, help="image side in pixels")
    model.add_argument("--patch_size", default=None, type=int,
                       help="patch side in pixels, instead of the model's (e.g. 8 or 4 for small images)")
    model.add_argument("--mask_ratio", default=0.75, type=float, help="share of patches hidden from the encoder")
    model.add_argument("--norm_pix_loss", action="store_true", help="regress per-patch normalized pixels")
    model.add_argument("--drop_path", default=0.0, type=float, help="stochastic depth of the encoder")

    add_optimizer_args(parser, weight_decay=0.05, betas=(0.9, 0.95))
    utils.add_schedule_args(parser, blr=1.5e-4, min_lr=0.0, warmup_epochs=40)
    data = utils.add_loading_args(parser)
    data.add_argument("--data_path", default=None, type=str, help="image folder (ImageFolder layout or flat)")
    data.add_argument("--data_set", default=None, choices=["image_folder", "synthetic"],
                      help="default: image_folder with --data_path, synthetic without")
    data.add_argument("--decoder", default="pil", choices=DECODERS,
                      help="tensor: decode with torchcodec/torchvision.io and augment uint8 tensors in the workers, "
                           "about 2x PIL's images/s; device: the workers read JPEG bytes and draw the crops, the "
                           "training device decodes (nvJPEG on CUDA) and crops whole batches "
                           "(benchmarks/RESULTS.md); both for image folders only")
    utils.add_run_args(parser)
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Refuse bad command lines before anything is built or written."""
    utils.validate_common_args(args)
    try:
        check_mask_ratio(args.mask_ratio)
    except ValueError as error:
        raise utils.UsageError(f"--mask_ratio: {error}") from error
    if args.data_set is None:
        args.data_set = "image_folder" if args.data_path else "synthetic"
    if args.data_set == "image_folder" and not args.data_path:
        raise utils.UsageError("--data_set image_folder needs --data_path; omit both for the synthetic dataset")
    if args.data_path and not Path(args.data_path).is_dir():
        raise utils.UsageError(f"--data_path {args.data_path} is not a directory")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The registered MAE named by ``--model`` at ``--input_size``."""
    utils.check_model_name(args.model, "pretrain_mae_*")
    model = timm.create_model(
        args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss, drop_path_rate=args.drop_path,
        **utils.patch_size_kwargs(args),
    )
    patch = model.patch_size
    if args.input_size % patch:
        raise utils.UsageError(f"--input_size {args.input_size} is not divisible by the patch size {patch}")
    return model


def build_loader(args: argparse.Namespace) -> DataLoader:
    """Shuffled, rank-sharded batches of uint8 images; see ``datasets.build_train_loader``."""
    try:
        dataset = build_pretraining_dataset(
            args.data_set, args.data_path, args.input_size, num_samples=args.num_samples, decoder=args.decoder,
        )
    except (FileNotFoundError, ValueError) as error:
        raise utils.UsageError(str(error)) from error
    return build_train_loader(dataset, args, collate_encoded if args.decoder == "device" else None)


def picture_batch(loader: DataLoader, device: torch.device, num_patches: int, args: argparse.Namespace):
    """A fixed set of images, normalized, and masks drawn from ``--seed``, so the pictures of
    successive epochs compare."""
    samples = [loader.dataset[(i, 0)] for i in range(min(NUM_PICTURES, len(loader.dataset)))]  # epoch-0 crops
    imgs = normalize_on_device(batch_images(loader.collate_fn(samples), device), args.mean, args.std)
    generator = torch.Generator().manual_seed(args.seed)
    masks = random_masks(len(samples), num_patches, args.mask_ratio, generator=generator)  # (B, N)
    return imgs, masks.to(device)


def write_pictures(model: torch.nn.Module, batch, args: argparse.Namespace, epoch: int, log_writer) -> None:
    """``reconstruction.png`` in output_dir (latest) and an image series in TensorBoard."""
    if not utils.is_main_process():
        return
    grid = reconstruction_grid(utils.unwrap_model(model), *batch, args.mean, args.std)
    if args.output_dir:
        save_png(grid, Path(args.output_dir) / "reconstruction.png")
    if log_writer is not None:
        log_writer.add_image("reconstruction", grid, epoch)


def main(args: argparse.Namespace) -> torch.nn.Module:
    """Pretrain as ``args`` say; returns the trained model (for scripts that go on with it)."""
    validate_args(args)
    return utils.run_distributed(run, args)


def run(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    args.amp = utils.resolve_amp(args.amp, device)
    utils.seed_everything(args.seed, args.rank)
    model = build_model(args).to(device)
    utils.use_fastest_attention(model, device, args.amp)
    loader = build_loader(args)
    utils.check_writable_dir(args.output_dir, "--output_dir")  # only once the inputs are known good
    utils.resolve_lr(args)
    optimizer = create_optimizer(args, model, device)
    scaler = utils.make_grad_scaler(device, args.amp)
    checkpoint = utils.resume_training_state(args, model, optimizer, scaler)
    if utils.is_main_process():
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model {args.model}: {n_params / 1e6:.2f}M parameters; {len(loader.dataset)} images; "
              f"effective batch {args.eff_batch_size}; lr {args.lr:.3e} (blr {args.blr:g}); amp {args.amp}")
    pictures = picture_batch(loader, device, model.patch_embed.num_patches, args)
    ddp_model = utils.wrap_ddp(utils.maybe_compile(model, args.compile), device, args)
    with utils.training_writer(args.log_dir) as log_writer:
        run_epochs(ddp_model, loader, optimizer, scaler, device, args, log_writer, pictures, checkpoint)
    return model


def run_epochs(model, loader, optimizer, scaler, device, args, log_writer, pictures, checkpoint) -> None:
    timer = utils.Timer()
    for epoch in range(args.start_epoch, args.epochs):
        start = utils.epoch_start(loader, epoch, args, checkpoint)
        save_step = utils.step_saver(model, optimizer, scaler, epoch, args)
        stats = train_one_epoch(model, loader, optimizer, scaler, device, epoch, args, log_writer, **start,
                                save_step=save_step)
        utils.save_epoch(model, optimizer, scaler, epoch, args)
        write_pictures(model, pictures, args, epoch, log_writer)
        record: Dict[str, float] = {f"train_{key}": value for key, value in stats.items()}
        record.update(epoch=epoch, n_parameters=sum(p.numel() for p in model.parameters()),
                      skipped_images=skipped_images(loader.dataset, device))
        utils.append_log(args.output_dir, record)
        if utils.is_main_process():
            print(json.dumps(record), flush=True)
    if utils.is_main_process():
        print(f"training time {utils.format_eta(timer.elapsed())}")


if __name__ == "__main__":
    utils.exit_on_usage_error(main, get_args_parser().parse_args())
