"""MAE checkpoints into and out of Hugging Face ``transformers``' ``ViTMAEForPreTraining``.

    python convert_checkpoint.py output_dir/checkpoint-last.pth hf_folder     # ours or official -> HF
    python convert_checkpoint.py hf_folder mae.pth                            # HF -> ours

To Hugging Face: any checkpoint with the decoder that our scripts read (ours, a sharded folder, an
official MAE one such as ``mae_visualize_vit_large.pth``, with ``--model`` and ``--norm_pix_loss``
since official files record neither) becomes a ``save_pretrained`` folder (``config.json``,
``model.safetensors``, ``preprocessor_config.json``) that ``ViTMAEForPreTraining.from_pretrained``
loads with no missing or unexpected keys. From Hugging Face: a folder of either transformers 4.x
or 5.x (or its ``model.safetensors`` / ``pytorch_model.bin``) becomes our format: ``model`` with
the official keys and ``args`` (model, input size, channels, norm-pix flag, mask ratio, mean,
std). ``--finetune``, ``--init_from`` and ``run_mae_vis.py --model_path`` also read such a folder
directly. Nothing is downloaded.
"""
import argparse
from pathlib import Path

import modeling_pretrain  # noqa: F401  (registers the pretrain_mae_* models with timm)
import utils
from training.checkpoint_files import save_atomic
from training.config_file import ConfigArgumentParser
from training.hub import resolve_checkpoint
from training.weight_files import read_weights
from training.hf_checkpoint import hf_folder, write_hf
from modeling_finetune import unwrap_state_dict


def get_args_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser("Convert MAE checkpoints to and from Hugging Face ViTMAE", add_help=True)
    parser.add_argument("source", help="a checkpoint (file or sharded folder) or a Hugging Face folder / weight file")
    parser.add_argument("destination", help="a folder to write (to Hugging Face) or a .pth file (from it)")
    parser.add_argument("--model", default=None,
                        help="to Hugging Face: the pretrain_mae_* model, for checkpoints that do not record it")
    parser.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                        help="to Hugging Face: whether it predicts normalized pixels (default: the checkpoint's)")
    parser.add_argument("--mask_ratio", default=None, type=float, help="to Hugging Face (default: the checkpoint's)")
    return parser


def from_hugging_face(args: argparse.Namespace) -> Path:
    destination = Path(args.destination)
    if destination.suffix != ".pth":
        raise utils.UsageError(f"a Hugging Face folder converts to our format: give a .pth file, not {destination}")
    checkpoint = read_weights(Path(args.source))
    utils.check_writable_dir(str(destination.parent), "destination")
    save_atomic({"model": checkpoint["model"], "args": checkpoint["args"]}, destination)
    return destination


def to_hugging_face(args: argparse.Namespace) -> Path:
    checkpoint = read_weights(Path(args.source))
    state = unwrap_state_dict(checkpoint)
    saved = dict(checkpoint.get("args") or {})
    overrides = {"model": args.model, "norm_pix_loss": args.norm_pix_loss, "mask_ratio": args.mask_ratio}
    saved.update({key: value for key, value in overrides.items() if value is not None})
    if saved.get("model") is None:
        raise utils.UsageError(f"{args.source} does not record its model: pass --model pretrain_mae_..._224")
    destination = Path(args.destination)
    if destination.suffix == ".pth":
        raise utils.UsageError("our checkpoints convert to a Hugging Face folder: give a folder, not a .pth file")
    utils.check_writable_dir(str(destination), "destination")
    try:
        left_over = write_hf(state, saved, destination)
    except (KeyError, ValueError) as error:
        raise utils.UsageError(f"{args.source} does not convert: {error}") from error
    if left_over:
        raise RuntimeError(f"the conversion left keys unmatched: {left_over}")
    return destination


def main(args: argparse.Namespace) -> Path:
    """Convert in the direction the source says (a Hub name is a source in the Hub cache); returns
    what was written."""
    args = argparse.Namespace(**{**vars(args), "source": resolve_checkpoint(args.source, "source")})
    if not Path(args.source).exists():
        raise utils.UsageError(f"{args.source} does not exist; check the path")
    written = from_hugging_face(args) if hf_folder(Path(args.source)) else to_hugging_face(args)
    print(f"wrote {written}")
    return written


if __name__ == "__main__":
    utils.exit_on_usage_error(main, get_args_parser().parse_args())
