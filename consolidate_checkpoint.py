"""One file of a sharded checkpoint's model: ``python consolidate_checkpoint.py OUTPUT_DIR/checkpoint-last``.

``--fsdp`` writes its checkpoints as folders of shards and ends the run with such a file; this
makes one from any of the folders, in one process without a GPU, so finetuning, k-NN, the probe,
the pictures and the official MAE tools read it as they read every other checkpoint (``model``
with the official keys, ``epoch``, ``args``; ``torch.load(..., weights_only=True)``). The
optimizer and the position in the epoch stay in the folder, which resumes with ``--fsdp``.
"""
import argparse
from pathlib import Path

import utils
from training.checkpoint import consolidated_name
from training.checkpoint_files import read_checkpoint, save_atomic
from training.config_file import ConfigArgumentParser
from training.sharded_checkpoint import is_sharded_checkpoint, read_model_state


def get_args_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser("Consolidate a sharded MAE checkpoint", add_help=True)
    parser.add_argument("checkpoint", help="a checkpoint folder written with --fsdp (e.g. output_dir/checkpoint-last)")
    parser.add_argument("--output", default=None,
                        help="the file to write (default: checkpoint-{epoch}[-step{step}]-consolidated.pth beside it)")
    return parser


def main(args: argparse.Namespace) -> Path:
    """Write the consolidated file; returns its path."""
    folder = Path(args.checkpoint)
    if not is_sharded_checkpoint(folder):
        raise utils.UsageError(f"{folder} is no sharded checkpoint folder (those --fsdp writes); files need no "
                               "consolidating")
    meta = read_checkpoint(folder)
    output = Path(args.output) if args.output else folder.parent / consolidated_name(meta["epoch"], meta.get("step"))
    utils.check_writable_dir(str(output.parent), "--output")
    save_atomic({"model": read_model_state(folder), "epoch": meta["epoch"], "args": meta["args"]}, output)
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    utils.exit_on_usage_error(main, get_args_parser().parse_args())
