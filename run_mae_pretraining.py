"""MAE pretraining: ``python run_mae_pretraining.py`` (synthetic data, any machine) up to
``torchrun --nnodes N --nproc_per_node 8 run_mae_pretraining.py --data_path /imagenet/train``.
"""
import argparse
import functools
from pathlib import Path
from typing import Optional

import timm
import torch
from torch.utils.data import DataLoader

from modeling_pretrain import load_mae_weights  # and the pretrain_mae_* models, registered with timm
import utils
from datasets import CLASSIFICATION_SETS, DATA_SETS, DECODERS, build_pretraining_dataset, build_train_loader, check_readable
from engine_for_pretraining import pretrain
from evaluation.online import OnlineEvaluation
from evaluation.setup import build_datasets, unaugmented
from image_data.augmentation import PRETRAIN_CROP_SCALE, Crops
from image_data.device_decoder import collate_encoded
from image_data.geometry import to_grid
from optim_factory import add_optimizer_args, create_optimizer
from training import precision
from training.checkpoint import TrainingState
from training.config_file import ConfigArgumentParser
from training.weight_files import read_weights
from training.cli import (
    add_crop_args,
    add_loading_args,
    add_memory_args,
    add_run_args,
    add_schedule_args,
    add_shuffle_arg,
    add_size_args,
    check_model_name,
    check_patch_grid,
    patch_size_kwargs,
)
from training.config import (
    loading_of,
    online_data_of,
    online_of,
    optimizer_of,
    process_group_of,
    resolve_pretraining,
    shard_cache_of,
    training_of,
    wrapping_of,
)
from training.output_dir import claim_output_dir
from training.performance import use_fastest_attention
from training.wrapping import wrap_model
from visualization import picture_batch


def get_args_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser("MAE pretraining", add_help=True)
    parser.add_argument("--batch_size", default=64, type=int, help="images per GPU per step")
    parser.add_argument("--epochs", default=400, type=int, help="length of the schedule")
    parser.add_argument("--accum_iter", default=1, type=int, help="micro-steps per optimizer step")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="pretrain_mae_base_patch16_224", type=str, help="a pretrain_mae_* name")
    add_size_args(model)
    model.add_argument("--mask_ratio", default=0.75, type=float, help="share of patches hidden from the encoder")
    model.add_argument("--norm_pix_loss", action="store_true", help="regress per-patch normalized pixels")
    model.add_argument("--drop_path", default=0.0, type=float, help="stochastic depth of the encoder")
    model.add_argument("--init_from", default="", type=str,
                       help="start from these weights (ours, official MAE, a Hugging Face ViTMAE folder; an "
                            "encoder-only one leaves the decoder new) instead of at random; a checkpoint to resume "
                            "from still wins")

    add_crop_args(parser.add_argument_group("augmentation"), crop_scale=PRETRAIN_CROP_SCALE)
    add_optimizer_args(parser, weight_decay=0.05, betas=(0.9, 0.95))
    add_schedule_args(parser, blr=1.5e-4, min_lr=0.0, warmup_epochs=40)
    data = add_loading_args(parser)
    data.add_argument("--data_path", default=None, type=str,
                      help="image folder (ImageFolder layout or flat) or WebDataset tar shards: a.tar, "
                           "a-{000000..000099}.tar, a folder of .tar files, or a text file listing them")
    data.add_argument("--data_set", default=None, choices=DATA_SETS,
                      help="default: image_folder with --data_path, synthetic without; FashionMNIST: --data_path is "
                           "the folder of its IDX files (apt-get install dataset-fashion-mnist)")
    data.add_argument("--decoder", default="pil", choices=DECODERS,
                      help="tensor: decode with torchcodec/torchvision.io and augment uint8 tensors in the workers, "
                           "about 2x PIL's images/s; device: the workers read JPEG bytes and draw the crops, the "
                           "training device decodes (nvJPEG on CUDA) and crops whole batches "
                           "(benchmarks/RESULTS.md); both for RGB images")
    add_shuffle_arg(data)
    online = parser.add_argument_group("evaluation during pretraining (k-NN and the sweep probe on a labelled set)")
    online.add_argument("--eval_data_set", default=None, choices=CLASSIFICATION_SETS,
                        help="evaluate the encoder on this labelled set (default: IMNET with an --eval_data_path "
                             "folder, image_folder with shards; none without either)")
    online.add_argument("--eval_data_path", default=None, type=str,
                        help="IMNET: a folder with train/ and val/ class folders (what run_knn_eval.py --data_path "
                             "reads); image_folder: the training split, a folder or tar shards; CIFAR: its files")
    online.add_argument("--eval_val_path", default=None, type=str,
                        help="image_folder: the validation split, a folder or tar shards")
    online.add_argument("--eval_freq", default=10, type=int, help="evaluate every N epochs, and after the last")
    online.add_argument("--eval_probe", action=argparse.BooleanOptionalAction, default=True,
                        help="train the sweep probe too (run_linear_probe.py --protocol sweep); off: k-NN only")
    online.add_argument("--eval_num_samples", default=None, type=int, help="only the first N images of each split")
    add_memory_args(parser)
    add_run_args(parser)
    return parser


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The registered MAE named by ``--model`` at ``--input_size``."""
    check_model_name(args.model, "pretrain_mae_*")
    model = timm.create_model(
        args.model, img_size=to_grid(args.input_size), in_chans=args.in_chans, norm_pix_loss=args.norm_pix_loss,
        drop_path_rate=args.drop_path, **patch_size_kwargs(args.patch_size),
    )
    check_patch_grid(model, args.input_size)
    return model


def build_loader(args: argparse.Namespace) -> DataLoader:
    """Shuffled, rank-sharded batches of uint8 images (``datasets.build_train_loader``); a
    collective: a dataset (a tar shard, say) that one rank cannot read stops every rank."""
    dataset, error = None, None
    try:
        dataset = build_pretraining_dataset(
            args.data_set, args.data_path, Crops(args.input_size, tuple(args.crop_scale), args.hflip),
            num_samples=args.num_samples, decoder=args.decoder, in_chans=args.in_chans,
            max_pixels=args.max_image_pixels, index_dir=args.output_dir, cache=shard_cache_of(args),
        )
        check_readable(dataset)
    except (FileNotFoundError, ValueError) as found:
        error = utils.UsageError(str(found))
    except utils.UsageError as found:
        error = found
    utils.raise_on_all_ranks(error)
    return build_train_loader(dataset, loading_of(args), collate_encoded if args.decoder == "device" else None)


def build_online_evaluation(args: argparse.Namespace) -> Optional[OnlineEvaluation]:
    """The labelled splits the encoder is evaluated on while it pretrains, unaugmented (None
    without ``--eval_data_set``); a collective: data one rank cannot read stops every rank."""
    if not args.eval_data_set:
        return None
    transform = unaugmented(input_size=args.input_size, in_chans=args.in_chans)
    train, val, num_classes = build_datasets(online_data_of(args), transform, train=True)
    return OnlineEvaluation(train, val, num_classes, online_of(args))


def main(args: argparse.Namespace) -> torch.nn.Module:
    """Pretrain as ``args`` say; returns the trained model (for scripts that go on with it)."""
    args = resolve_pretraining(args)
    return utils.run_distributed(functools.partial(run, args), process_group_of(args))


def run(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    utils.seed_everything(args.seed, args.rank)
    model = build_model(args)
    if args.init_from:
        kept = load_mae_weights(model, read_weights(Path(args.init_from)), source=f"--init_from {args.init_from}",
                                decoder_required=False)
        if utils.is_main_process():
            print(f"started from the weights of {args.init_from}" + ("; its decoder is new" if kept else ""))
    model.to(device)
    use_fastest_attention(model, device, args.amp)
    model.set_grad_checkpointing(args.grad_checkpointing)
    loader = build_loader(args)
    online = build_online_evaluation(args)
    with claim_output_dir(args.output_dir):  # once the inputs are known good; held until the run ends
        wrapped = wrap_model(model, device, wrapping_of(args))  # before the optimizer, which must see FSDP's shards
        state = TrainingState(wrapped, create_optimizer(optimizer_of(args), model, device),
                              precision.make_grad_scaler(device, args.amp))
        if utils.is_main_process():
            n_params = sum(p.numel() for p in model.parameters())
            print(f"model {args.model}: {n_params / 1e6:.2f}M parameters; {len(loader.dataset)} images; "
                  f"effective batch {args.eff_batch_size}; lr {args.lr:.3e} (blr {args.blr:g}); amp {args.amp}")
            if online:
                print(f"evaluating on {args.eval_data_set} ({len(online.train)} training and {len(online.val)} "
                      f"validation images, {online.num_classes} classes) "
                      + (f"every {args.eval_freq} epochs and after the last" if args.eval_freq > 1 else "every epoch")
                      + ": k-NN" + (" and the sweep probe" if args.eval_probe else ""))
        pictures = picture_batch(loader, device, num_patches=model.patch_embed.num_patches, mean=args.mean,
                                 std=args.std, mask_ratio=args.mask_ratio, seed=args.seed)
        pretrain(state, loader, pictures=pictures, device=device, training=training_of(args, get_args_parser()),
                 mean=args.mean, std=args.std, mask_ratio=args.mask_ratio, online=online)
        return model


if __name__ == "__main__":
    utils.exit_on_usage_error(main, get_args_parser().parse_args())
