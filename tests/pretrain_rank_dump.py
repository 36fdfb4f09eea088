"""Pretrain under a launcher, then save this rank's final weights as rank{RANK}.pt."""
import os
from pathlib import Path

import torch

import run_mae_pretraining

if __name__ == "__main__":
    args = run_mae_pretraining.get_args_parser().parse_args()
    model = run_mae_pretraining.main(args)
    torch.save(model.state_dict(), Path(args.output_dir) / f"rank{os.environ['RANK']}.pt")
