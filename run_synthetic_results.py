"""The results tables of docs/results.md. On the synthetic dataset (the default): one MAE pretraining, then
k-NN, linear probe and finetuning accuracy of a random encoder (from scratch) and of the MAE encoder.
With ``--data_set FashionMNIST`` (its IDX files in ``--data_path``, Debian's by default): the same
comparison on real images with the raw pixels as the floor, the run's own evaluation curve, and
the paper's two ablations at this scale, the mask ratio and normalized-pixel targets, a second seed
for any two of their points within a point of each other (``fashion_mnist_results``).

``python run_synthetic_results.py`` runs every step in this process with the command line each
script would take, prints a markdown table with those commands and the time each took, and
writes the table to output_dir/results.md and a reconstruction picture to output_dir/vis. Run
again into the same output_dir, every step resumes its own folder: finished ones only evaluate,
and the table marks their times "(resumed)".
Pretraining takes most of the time (docs/results.md gives it): 240 epochs, because 40 left an encoder
that finetuned worse than a random one (docs/results.md).
"""
import argparse
import json
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
from image_data.idx import DEBIAN_FOLDER, read_split
from visualization import line_chart
from training.config_file import ConfigArgumentParser

SCRIPTS = {
    "run_mae_pretraining.py": run_mae_pretraining,
    "run_knn_eval.py": run_knn_eval,
    "run_linear_probe.py": run_linear_probe,
    "run_class_finetuning.py": run_class_finetuning,
    "run_mae_vis.py": run_mae_vis,
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser("MAE results on the synthetic dataset", add_help=True)
    parser.add_argument("--output_dir", default=None,
                        help="one folder per step (synthetic: output_dir/synthetic_results; FashionMNIST: "
                             "output_dir/fashion_mnist_results, so that the two never share a step's folder)")
    parser.add_argument("--num_samples", default=None, type=int,
                        help="training images (synthetic: 2048, validation 500; FashionMNIST: 5000 for pretraining "
                             "and finetuning)")
    parser.add_argument("--input_size", default=64, type=int, help="image side in pixels")
    parser.add_argument("--batch_size", default=None, type=int,
                        help="images per step in every stage (synthetic: 128; FashionMNIST: 32)")
    parser.add_argument("--pretrain_epochs", default=None, type=int, help="synthetic: 240; FashionMNIST: 16")
    parser.add_argument("--probe_epochs", default=10, type=int)
    parser.add_argument("--finetune_epochs", default=None, type=int, help="synthetic: 8; FashionMNIST: 10")
    parser.add_argument("--num_workers", default=2, type=int, help="data-loader processes of every stage")
    parser.add_argument("--data_set", default="synthetic", choices=["synthetic", "FashionMNIST"])
    parser.add_argument("--data_path", default=DEBIAN_FOLDER, help="FashionMNIST: the folder of its four IDX files")
    parser.add_argument("--eval_samples", default=2000, type=int,
                        help="FashionMNIST: images of each split the k-NN and the probes read")
    parser.add_argument("--patch_size", default=None, type=int, help="FashionMNIST: patch side at 28 pixels (7)")
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
    # the lr the batch would give (0.05) leaves the head at its initialization (docs/evaluation.md, "Linear probing")
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


# FashionMNIST's recipe fits the hour on 2 CPU cores (benchmarks/RESULTS.md, "Fashion-MNIST: choosing the
# recipe"): 7-pixel patches (16 a image) pretrain as well as 4-pixel ones (49) in half the time, and batch 32
# (4 times the steps) gives a better encoder than batch 128 in the same time
DEFAULTS = {
    "synthetic": {"output_dir": "output_dir/synthetic_results", "num_samples": 2048, "pretrain_epochs": 240,
                  "finetune_epochs": 8, "batch_size": 128},
    "FashionMNIST": {"output_dir": "output_dir/fashion_mnist_results", "num_samples": 5000, "pretrain_epochs": 16,
                     "finetune_epochs": 10, "batch_size": 32, "patch_size": 7},
}


def with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The data set's own defaults for what the command line leaves open."""
    chosen = {name: value for name, value in DEFAULTS[args.data_set].items() if getattr(args, name) is None}
    return argparse.Namespace(**{**vars(args), **chosen})


# ----------------------------------------------------------------------------- Fashion-MNIST

MASK_RATIOS = ("0.25", "0.5", "0.75", "0.9")  # the paper's Figure 5, at this scale
FASHION_IMAGES = ["--in_chans", "1", "--mean", "0.286", "--std", "0.353", "--input_size", "28"]  # its pixels' mean, std


def fashion_data(args: argparse.Namespace) -> List[str]:
    return ["--data_set", "FashionMNIST", "--data_path", args.data_path, *FASHION_IMAGES, "--patch_size",
            str(args.patch_size), "--num_workers", str(args.num_workers), "--device", "cpu"]


def pretraining(args: argparse.Namespace, *, mask_ratio: str, norm_pix: bool, seed: int, eval_freq: int) -> List[str]:
    """A tiny MAE on the first ``--num_samples`` training images, its encoder evaluated on the first
    ``--eval_samples`` of each split every ``eval_freq`` epochs."""
    return ["--model", "pretrain_mae_tiny_patch16_224", *fashion_data(args), "--num_samples", str(args.num_samples),
            "--batch_size", str(args.batch_size), "--print_freq", "1000", "--epochs", str(args.pretrain_epochs),
            "--warmup_epochs", str(max(1, args.pretrain_epochs // 6)), "--blr", "1.5e-3", "--mask_ratio", mask_ratio,
            *(["--norm_pix_loss"] if norm_pix else []), "--seed", str(seed), "--eval_data_set", "FashionMNIST",
            "--eval_data_path", args.data_path, "--eval_num_samples", str(args.eval_samples), "--eval_freq",
            str(eval_freq)]


def ablation_name(mask_ratio: str, norm_pix: bool, seed: int) -> str:
    return f"mae_mask{mask_ratio}" + ("" if norm_pix else "_pixels") + (f"_seed{seed}" if seed else "")


def fashion_commands(args: argparse.Namespace) -> Dict[str, Tuple[str, List[str]]]:
    """The main pretraining (mask 0.75, normalized pixels, evaluated every quarter of its epochs),
    the evaluations of its encoder, of a random one and of the raw pixels, finetuning from scratch and
    from it, and the ablations' pretrainings (evaluated after their last epoch)."""
    out = Path(args.output_dir)
    main_name = ablation_name("0.75", True, 0)
    checkpoint = str(out / main_name / "checkpoint-last.pth")
    vit = ["--model", "vit_tiny_patch16_224", *fashion_data(args)]
    features = [*vit, "--num_samples", str(args.eval_samples)]
    finetune = [*vit, "--num_samples", str(args.num_samples), "--batch_size", str(args.batch_size), "--print_freq",
                "1000", "--epochs", str(args.finetune_epochs), "--warmup_epochs", "1", "--blr", "4e-3", "--aa", "none",
                "--reprob", "0"]
    steps = {main_name: ("run_mae_pretraining.py", pretraining(args, mask_ratio="0.75", norm_pix=True, seed=0,
                                                                eval_freq=max(1, args.pretrain_epochs // 4)))}
    steps.update({
        "knn_random": ("run_knn_eval.py", features),
        "knn_pixels": ("run_knn_eval.py", [*features, "--features", "pixels"]),
        "knn_mae": ("run_knn_eval.py", [*features, "--finetune", checkpoint]),
        "sweep_pixels": ("run_linear_probe.py", [*features, "--protocol", "sweep", "--features", "pixels"]),
        "sweep_random": ("run_linear_probe.py", [*features, "--protocol", "sweep"]),
        "sweep_mae": ("run_linear_probe.py", [*features, "--protocol", "sweep", "--finetune", checkpoint]),
        "finetune_scratch": ("run_class_finetuning.py", finetune),
        "finetune_mae": ("run_class_finetuning.py", [*finetune, "--finetune", checkpoint]),
    })
    for mask_ratio, norm_pix in [(ratio, True) for ratio in MASK_RATIOS if ratio != "0.75"] + [("0.75", False)]:
        steps[ablation_name(mask_ratio, norm_pix, 0)] = ("run_mae_pretraining.py", pretraining(
            args, mask_ratio=mask_ratio, norm_pix=norm_pix, seed=0, eval_freq=args.pretrain_epochs))
    return {name: (script, argv + ["--output_dir", str(out / name)]) for name, (script, argv) in steps.items()}


def last_evaluation(folder: Path) -> Dict[str, float]:
    """The last evaluated epoch's line of a pretraining's ``log.txt``."""
    lines = [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]
    return [line for line in lines if "knn_acc1" in line][-1]


def close_pairs(figures: Dict[str, Dict[str, float]]) -> List[Tuple[str, str]]:
    """The comparisons a second seed must settle: normalized against raw pixels, and the two best
    mask ratios, when their probes are within a point of each other."""
    pairs = [(ablation_name("0.75", True, 0), ablation_name("0.75", False, 0))]
    ranked = sorted((ablation_name(ratio, True, 0) for ratio in MASK_RATIOS), key=lambda name: -figures[name]["probe_acc1"])
    pairs.append((ranked[0], ranked[1]))
    return [(a, b) for a, b in pairs if abs(figures[a]["probe_acc1"] - figures[b]["probe_acc1"]) < 1.0]


def seed_steps(args: argparse.Namespace, names: Set[str]) -> Dict[str, Tuple[str, List[str]]]:
    """Seed 1 of each named ablation run."""
    steps = {}
    for name in sorted(names):
        mask_ratio = name.removeprefix("mae_mask").split("_")[0]
        norm_pix = not name.endswith("_pixels")
        again = ablation_name(mask_ratio, norm_pix, 1)
        steps[again] = ("run_mae_pretraining.py", pretraining(args, mask_ratio=mask_ratio, norm_pix=norm_pix, seed=1,
                                                              eval_freq=args.pretrain_epochs)
                        + ["--output_dir", str(Path(args.output_dir) / again)])
    return steps


def fashion_mnist_results(args: argparse.Namespace) -> str:
    """Every Fashion-MNIST step, the seeds the close pairs need, the tables and the two figures."""
    out = Path(args.output_dir)
    steps = fashion_commands(args)
    results, seconds = {}, {}
    for name, (script, argv) in steps.items():
        results[name], seconds[name] = run_step(script, argv)
    figures = {name: last_evaluation(out / name) for name, (script, _) in steps.items() if script == "run_mae_pretraining.py"}
    again = seed_steps(args, {name for pair in close_pairs(figures) for name in pair})
    for name, (script, argv) in again.items():
        results[name], seconds[name] = run_step(script, argv)
        figures[name] = last_evaluation(out / name)
    steps.update(again)
    main_name = ablation_name("0.75", True, 0)
    curve = [json.loads(line) for line in (out / main_name / "log.txt").read_text().splitlines()]
    curve = [line for line in curve if "knn_acc1" in line]
    line_chart({"probe (sweep)": [(line["epoch"] + 1, line["probe_acc1"]) for line in curve],
                "20-NN": [(line["epoch"] + 1, line["knn_acc1"]) for line in curve]},
               x_label="epochs pretrained", y_label="top-1 (%)", title="Fashion-MNIST: the MAE encoder as it pretrains",
               path=out / "curve.png")
    line_chart({"probe (sweep)": [(float(ratio), figures[ablation_name(ratio, True, 0)]["probe_acc1"]) for ratio in MASK_RATIOS],
                "20-NN": [(float(ratio), figures[ablation_name(ratio, True, 0)]["knn_acc1"]) for ratio in MASK_RATIOS]},
               x_label="mask ratio", y_label="top-1 (%)", title="Fashion-MNIST: mask ratio (normalized pixels, seed 0)",
               path=out / "mask_ratio.png")
    report = fashion_tables(results, seconds, steps, figures)
    report += f"\n\n{torch.get_num_threads()} CPU threads, {sum(seconds.values()) / 60:.1f} minutes in all."
    (out / "results.md").write_text(report + "\n")
    print("\n" + report)
    return report


FASHION_ROWS: List[Tuple[str, str, Callable[[Dict], str]]] = [
    ("k-NN, raw pixels", "knn_pixels", lambda record: f"{record['knn_acc1']['20']:.1f}"),
    ("k-NN, random encoder", "knn_random", lambda record: f"{record['knn_acc1']['20']:.1f}"),
    ("k-NN, MAE encoder", "knn_mae", lambda record: f"{record['knn_acc1']['20']:.1f}"),
    ("linear probe (sweep), raw pixels", "sweep_pixels", lambda record: f"{record['test_acc1']:.1f}"),
    ("linear probe (sweep), random encoder", "sweep_random", lambda record: f"{record['test_acc1']:.1f}"),
    ("linear probe (sweep), MAE encoder", "sweep_mae", lambda record: f"{record['test_acc1']:.1f}"),
    ("finetuning from scratch", "finetune_scratch", top1_cell),
    ("finetuning from the MAE encoder", "finetune_mae", top1_cell),
]


def fashion_tables(results: Dict[str, object], seconds: Dict[str, float], steps: Dict[str, Tuple[str, List[str]]],
                   figures: Dict[str, Dict[str, float]]) -> str:
    """The evaluations' table (20-NN and probe top-1 on the first ``--eval_samples`` test images,
    finetuning on the first ``--num_samples``) and the ablations' (each pretraining's own evaluation
    after its last epoch)."""
    lines = ["| evaluation | top-1 (%) | time | command |", "|---|---|---|---|"]
    for label, name, cell in FASHION_ROWS:
        script, argv = steps[name]
        lines.append(f"| {label} | {cell(results[name])} | {seconds[name] / 60:.1f} min | "
                     f"`python {script} {shlex.join(argv)}` |")
    lines += ["", "| pretraining | 20-NN (%) | probe (%) | time | command |", "|---|---|---|---|---|"]
    for name in sorted(figures):
        script, argv = steps[name]
        lines.append(f"| {name} | {figures[name]['knn_acc1']:.1f} | {figures[name]['probe_acc1']:.1f} | "
                     f"{seconds[name] / 60:.1f} min | `python {script} {shlex.join(argv)}` |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> str:
    """Run every step and return the table (also printed and written to results.md)."""
    args = with_defaults(args)
    if args.data_set == "FashionMNIST":
        try:  # before anything is written
            read_split(args.data_path, "train")
            read_split(args.data_path, "val")
        except (FileNotFoundError, ValueError) as error:
            raise utils.UsageError(str(error)) from error
    utils.check_writable_dir(args.output_dir, "--output_dir")
    if args.data_set == "FashionMNIST":
        return fashion_mnist_results(args)
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
