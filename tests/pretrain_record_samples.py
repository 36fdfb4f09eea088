"""Pretrain under any launcher, recording every training step (``helpers.recording``) in
$RECORD_DIR; an unsharded run then saves this rank's final weights there as weights_rank{RANK}.pt,
and every process its exit code as exit_rank{RANK} (``helpers.exit_code_recorded``)."""
import os
from pathlib import Path

import torch

import run_mae_pretraining
from helpers import exit_code_recorded, recording


def main(args) -> None:
    record_dir, rank = Path(os.environ["RECORD_DIR"]), int(os.environ.get("RANK", "0"))
    with recording(record_dir, rank):
        model = run_mae_pretraining.main(args)
    if not args.fsdp:  # a sharded model's weights are each rank's shards
        torch.save(model.state_dict(), record_dir / f"weights_rank{rank}.pt")


if __name__ == "__main__":
    with exit_code_recorded():
        run_mae_pretraining.utils.exit_on_usage_error(main, run_mae_pretraining.get_args_parser().parse_args())
