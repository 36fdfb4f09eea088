"""The README's results table on the synthetic dataset: one MAE pretraining, then k-NN, linear probe
and finetuning accuracy of a random encoder (from scratch) and of the MAE encoder.

``python run_synthetic_results.py`` runs every step in this process with the command line each
script would take, prints a markdown table with those commands and the time each took, and
writes the table to output_dir/results.md and a reconstruction picture to output_dir/vis. Run
again into the same output_dir, every step resumes its own folder: finished ones only evaluate,
and the table marks their times "(resumed)".
Pretraining takes most of the time (the README gives it): 240 epochs, because 40 left an encoder
that finetuned worse than a random one (README).
"""
import argparse
import shlex
import time
from pathlib import Path
from typing import Callable, Dict, List, Set, Tuple

import torch

import run_class_finetuning
import run_knn_eval
import run_linear_probe
import run_mae_pretraining
import run_mae_vis
import utils

SCRIPTS = {
    "run_mae_pretraining.py": run_mae_pretraining,
    "run_knn_eval.py": run_knn_eval,
    "run_linear_probe.py": run_linear_probe,
    "run_class_finetuning.py": run_class_finetuning,
    "run_mae_vis.py": run_mae_vis,
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE results on the synthetic dataset", add_help=True)
    parser.add_argument("--output_dir", default="output_dir/synthetic_results", help="one folder per step")
    parser.add_argument("--num_samples", default=2048, type=int, help="training images (validation: 500)")
    parser.add_argument("--input_size", default=64, type=int, help="image side in pixels")
    parser.add_argument("--batch_size", default=128, type=int, help="images per step in every stage")
    parser.add_argument("--pretrain_epochs", default=240, type=int)
    parser.add_argument("--probe_epochs", default=10, type=int)
    parser.add_argument("--finetune_epochs", default=8, type=int)
    parser.add_argument("--num_workers", default=2, type=int, help="data-loader processes of every stage")
    return parser


def commands(args: argparse.Namespace) -> Dict[str, Tuple[str, List[str]]]:
    """Every step as (script, argv), in the order they run; the evaluations read the pretraining's
    last checkpoint."""
    out = Path(args.output_dir)
    checkpoint = str(out / "pretrain" / "checkpoint-last.pth")
    shared = ["--input_size", str(args.input_size), "--num_samples", str(args.num_samples),
              "--num_workers", str(args.num_workers), "--device", "cpu"]
    train = ["--batch_size", str(args.batch_size), "--print_freq", "1000"]
    vit = ["--model", "vit_tiny_patch16_224", *shared]
    # The paper's probe lr at its batch of 16384 (blr 0.1 x 16384 / 256 = 6.4), kept at batch 128, where
    # the lr the batch would give (0.05) leaves the head at its initialization (README, "Linear probing")
    probe = [*vit, *train, "--epochs", str(args.probe_epochs), "--warmup_epochs", "1", "--lr", "6.4"]
    # No RandAugment or random erasing: with them 8 epochs leave both encoders near chance.
    finetune = [*vit, *train, "--epochs", str(args.finetune_epochs), "--warmup_epochs", "1", "--blr", "4e-3",
                "--aa", "none", "--reprob", "0"]
    steps = {  # pretraining warms up for a 20th of its epochs, as the paper's 40 of 800
        "pretrain": ("run_mae_pretraining.py", [
            "--model", "pretrain_mae_tiny_patch16_224", *shared, *train, "--epochs", str(args.pretrain_epochs),
            "--warmup_epochs", str(max(1, args.pretrain_epochs // 20)), "--blr", "1.5e-3", "--norm_pix_loss"]),
        "knn_random": ("run_knn_eval.py", [*vit]),
        "knn_mae": ("run_knn_eval.py", [*vit, "--finetune", checkpoint]),
        "probe_random": ("run_linear_probe.py", [*probe]),
        "probe_mae": ("run_linear_probe.py", [*probe, "--finetune", checkpoint]),
        "sweep_random": ("run_linear_probe.py", [*vit, "--protocol", "sweep"]),
        "sweep_mae": ("run_linear_probe.py", [*vit, "--protocol", "sweep", "--finetune", checkpoint]),
        "finetune_scratch": ("run_class_finetuning.py", [*finetune]),
        "finetune_mae": ("run_class_finetuning.py", [*finetune, "--finetune", checkpoint]),
    }
    steps = {name: (script, argv + ["--output_dir", str(out / name)]) for name, (script, argv) in steps.items()}
    steps["vis"] = ("run_mae_vis.py", ["synthetic", str(out / "vis"), "--model_path", checkpoint,
                                       "--num_images", "6", "--device", "cpu"])
    return steps


def run_step(script: str, argv: List[str]) -> Tuple[object, float]:
    """``python script argv`` in this process; returns its result and the seconds it took."""
    module = SCRIPTS[script]
    print(f"\n$ python {script} {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    result = module.main(module.get_args_parser().parse_args(argv))
    return result, time.perf_counter() - start


def knn_cell(record: Dict) -> str:
    return ", ".join(f"{k}-NN {value:.1f}" for k, value in record["knn_acc1"].items())


def top1_cell(stats: Dict) -> str:
    return f"{stats['acc1']:.1f}"


def sweep_cell(record: Dict) -> str:
    return (f"{record['test_acc1']:.1f} (lr {record['lr']:g}, weight decay {record['weight_decay']:g}; the best head "
            f"on the validation images: {record['test_acc1_best_on_val']:.1f})")


ROWS: List[Tuple[str, str, Callable[[Dict], str]]] = [
    ("k-NN, random encoder", "knn_random", knn_cell),
    ("k-NN, MAE encoder", "knn_mae", knn_cell),
    ("linear probe, random encoder", "probe_random", top1_cell),
    ("linear probe, MAE encoder", "probe_mae", top1_cell),
    ("linear probe (sweep), random encoder", "sweep_random", sweep_cell),
    ("linear probe (sweep), MAE encoder", "sweep_mae", sweep_cell),
    ("finetuning from scratch", "finetune_scratch", top1_cell),
    ("finetuning from the MAE encoder", "finetune_mae", top1_cell),
]


def table(results: Dict[str, object], seconds: Dict[str, float], steps: Dict[str, Tuple[str, List[str]]],
          resumed: Set[str]) -> str:
    """The markdown table: top-1 on the 500 validation images (last epoch), time and command.
    A step in ``resumed`` continued a run already in its folder, so its time is not the whole run's."""
    lines = ["| evaluation | top-1 (%) | time | command |", "|---|---|---|---|"]
    for label, name, cell in [("MAE pretraining", "pretrain", lambda _: "")] + ROWS:
        script, argv = steps[name]
        note = " (resumed)" if name in resumed else ""
        lines.append(f"| {label} | {cell(results[name])} | {seconds[name] / 60:.1f} min{note} | "
                     f"`python {script} {shlex.join(argv)}` |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> str:
    """Run every step and return the table (also printed and written to results.md)."""
    utils.check_writable_dir(args.output_dir, "--output_dir")
    steps = commands(args)
    resumed = {name for name in steps if (Path(args.output_dir) / name / "checkpoint-last.pth").exists()}
    results, seconds = {}, {}
    for name, (script, argv) in steps.items():
        results[name], seconds[name] = run_step(script, argv)
    report = table(results, seconds, steps, resumed)
    total = sum(seconds.values()) / 60
    report += f"\n\n{torch.get_num_threads()} CPU threads, {total:.1f} minutes in all."
    (Path(args.output_dir) / "results.md").write_text(report + "\n")
    print("\n" + report)
    return report


if __name__ == "__main__":
    utils.exit_on_usage_error(main, get_args_parser().parse_args())
