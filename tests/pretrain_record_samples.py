"""Pretrain under any launcher, appending the (epoch, index) of every sample each training step
trains on, and the step's loss, to samples_rank{RANK}.jsonl in $RECORD_DIR, one JSON line per step;
an unsharded run then saves this rank's final weights there as weights_rank{RANK}.pt, and every
process its exit code as exit_rank{RANK} (``helpers.exit_code_recorded``)."""
import json
import os
from pathlib import Path

import torch

import datasets
import engine_for_pretraining
import run_mae_pretraining
from helpers import exit_code_recorded

KEY = 10**6  # label = epoch * KEY + index: pretraining ignores labels, so they can carry the key


def keyed_item(self, key):
    index, epoch = key
    image, _ = original_item(self, key)
    return image, epoch * KEY + index


def recording_loss(*args, **kwargs):
    loss_fn = original_loss(*args, **kwargs)
    record = Path(os.environ["RECORD_DIR"]) / f"samples_rank{os.environ.get('RANK', '0')}.jsonl"

    def loss(batch):
        keys = [divmod(int(label), KEY) for label in batch[1]]  # (epoch, index) pairs
        value = loss_fn(batch)
        with open(record, "a") as handle:
            handle.write(json.dumps({"keys": keys, "loss": float(value)}) + "\n")
        return value

    return loss


original_item, datasets.SeededSamples.__getitem__ = datasets.SeededSamples.__getitem__, keyed_item
original_loss, engine_for_pretraining.reconstruction_loss = engine_for_pretraining.reconstruction_loss, recording_loss

def main(args) -> None:
    model = run_mae_pretraining.main(args)
    if not args.fsdp:  # a sharded model's weights are each rank's shards
        torch.save(model.state_dict(), Path(os.environ["RECORD_DIR"]) / f"weights_rank{os.environ.get('RANK', '0')}.pt")


if __name__ == "__main__":
    with exit_code_recorded():
        run_mae_pretraining.utils.exit_on_usage_error(main, run_mae_pretraining.get_args_parser().parse_args())
