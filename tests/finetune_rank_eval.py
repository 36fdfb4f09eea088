"""Evaluate under a launcher, then write this rank's numbers to eval_rank{RANK}.json."""
import json
import os
from pathlib import Path

import run_class_finetuning

if __name__ == "__main__":
    args = run_class_finetuning.get_args_parser().parse_args()
    stats = run_class_finetuning.main(args)
    (Path(args.output_dir) / f"eval_rank{os.environ['RANK']}.json").write_text(json.dumps(stats))
