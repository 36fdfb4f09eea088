"""The largest pretraining batch one device holds, for each model: a doubling search, then a
bisection, on ``torch.cuda.OutOfMemoryError``, each try a few real training steps (sharded with
``--fsdp`` over the processes, activations recomputed with ``--grad_checkpointing``, AdamW, bf16);
then images/s and peak memory at that batch. One JSON line per model, the last one with them all.

    torchrun --nproc_per_node 1 benchmarks/bench_max_batch.py --fsdp --grad_checkpointing \
        --models pretrain_mae_large_patch16_224 pretrain_mae_huge_patch14_224

On a CPU nothing runs out of memory, so ``--max_batch`` ends the doubling there (a dry run). Meant
for one process per device: an out-of-memory error inside one rank's collective would leave the
others waiting.
"""
import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import timm  # noqa: E402

import modeling_pretrain  # noqa: E402,F401  registers the pretrain_mae_* models
import utils  # noqa: E402
from bench_train import pretrain_loss, train_step  # noqa: E402
from masking_generator import random_masks  # noqa: E402
from optim_factory import add_optimizer_args, create_optimizer  # noqa: E402
from training import precision  # noqa: E402
from training.checkpoint import TrainingState  # noqa: E402
from training.config import optimizer_of  # noqa: E402
from training.performance import use_fastest_attention  # noqa: E402
from training.wrapping import Wrapping, wrap_model  # noqa: E402

MODELS = ("pretrain_mae_large_patch16_224", "pretrain_mae_huge_patch14_224", "pretrain_mae_giant_patch14_224",
          "pretrain_mae_2b_patch14_224")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=list(MODELS), nargs="+", help="pretrain_mae_* names")
    precision.add_amp_arg(parser, default="bf16", help="precision of the steps")
    parser.add_argument("--fsdp", action="store_true", help="shard over the processes (FSDP2), as --fsdp trains")
    parser.add_argument("--grad_checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--start_batch", default=16, type=int, help="the doubling's first batch")
    parser.add_argument("--max_batch", default=65536, type=int, help="stop doubling here (a CPU never runs out)")
    parser.add_argument("--resolution", default=0.05, type=float,
                        help="bisect until the failing batch is within this share of the largest that fits")
    parser.add_argument("--steps", default=2, type=int, help="training steps per try (the first allocates)")
    parser.add_argument("--timed_steps", default=5, type=int, help="steps timed at the largest batch")
    parser.add_argument("--input_size", default=224, type=int)
    parser.add_argument("--lr", default=1.0e-4, type=float, help="any positive lr: only the cost is measured")
    add_optimizer_args(parser, weight_decay=0.05, betas=(0.9, 0.95))
    return parser.parse_args(argv)


def build(name: str, batch: int, args: argparse.Namespace, device: torch.device):
    """The model, sharded and wrapped as ``--fsdp`` trains it, its optimizer, and a step on ``batch``
    random images with MAE's masks."""
    model = timm.create_model(name, img_size=args.input_size).to(device)
    use_fastest_attention(model, device, args.amp)
    model.set_grad_checkpointing(args.grad_checkpointing)
    wrapped = wrap_model(model, device, Wrapping(fsdp=args.fsdp, amp=args.amp, distributed=utils.get_world_size() > 1))
    state = TrainingState(wrapped, create_optimizer(optimizer_of(args), model, device),
                          precision.make_grad_scaler(device, args.amp))
    imgs = torch.randn(batch, 3, args.input_size, args.input_size, device=device)  # (B, 3, H, W)
    masks = random_masks(batch, model.patch_embed.num_patches, 0.75, device=device)  # (B, N)
    return train_step(state, pretrain_loss(imgs, masks), device, args.amp)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fits(name: str, batch: int, args: argparse.Namespace, device: torch.device) -> bool:
    """Whether ``args.steps`` training steps at ``batch`` run on every rank (they agree on it); one
    line each, so a search cut short by a time limit still shows the largest batch it found."""
    try:
        step = build(name, batch, args, device)
        for _ in range(args.steps):
            step()
        torch.get_device_module(device).synchronize(device)
        ok = 1
    except torch.cuda.OutOfMemoryError:
        ok = 0
    step = None
    release(device)
    ok = utils.all_reduce_min(ok, device)
    if utils.is_main_process():
        print(json.dumps({"model": name, "batch": batch, "fits": bool(ok)}), flush=True)
    return bool(ok)


def largest_batch(name: str, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """Doubling from ``--start_batch`` to the first batch that does not fit, then bisection."""
    good, bad, tries = 0, None, []
    batch = min(args.start_batch, args.max_batch)
    while batch <= args.max_batch:
        tries.append(batch)
        if not fits(name, batch, args, device):
            bad = batch
            break
        good, batch = batch, batch * 2
    while bad is not None and good and bad - good > max(1, args.resolution * good):
        middle = (good + bad) // 2
        tries.append(middle)
        good, bad = (middle, bad) if fits(name, middle, args, device) else (good, middle)
    return {"largest_batch": good, "first_failing": bad, "tries": tries}


def total_peak_bytes(step, device: torch.device) -> int:
    """CUDA: the allocator's peak over one step, weights and optimizer state included. CPU: the
    process's peak resident set."""
    if device.type != "cuda":
        step()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    torch.cuda.reset_peak_memory_stats(device)
    step()
    return torch.cuda.max_memory_allocated(device)


def measure(name: str, batch: int, args: argparse.Namespace, device: torch.device) -> Dict[str, float]:
    """Images/s (median step) and peak memory at ``batch``."""
    step = build(name, batch, args, device)
    peak = total_peak_bytes(step, device)
    times = []
    for _ in range(args.timed_steps):
        torch.get_device_module(device).synchronize(device)
        start = time.perf_counter()
        step()
        torch.get_device_module(device).synchronize(device)
        times.append(time.perf_counter() - start)
    step = None
    release(device)
    seconds = sorted(times)[len(times) // 2]
    return {"images_per_s": batch * utils.get_world_size() / seconds, "ms_per_step": 1000 * seconds,
            "peak_mem_gib": peak / 2**30}


def main(args: argparse.Namespace) -> List[Dict[str, Any]]:
    device = utils.init_distributed(args.device, group_of_one=args.fsdp)
    try:
        reports = []
        for name in args.models:
            report = {"model": name, "device": str(device), "world_size": utils.get_world_size(), "amp": args.amp,
                      "fsdp": args.fsdp, "grad_checkpointing": args.grad_checkpointing,
                      **largest_batch(name, args, device)}
            if report["largest_batch"]:
                report.update(measure(name, report["largest_batch"], args, device))
            reports.append(report)
            if utils.is_main_process():
                print(json.dumps(report), flush=True)
        if utils.is_main_process():
            print(json.dumps({"largest_batches": reports}), flush=True)
        return reports
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    main(parse_args())
