"""Time complete training steps (forward, backward, optimizer) of MAE pretraining and finetuning.

Each step is timed after warm-up and the median of the repeats is reported as images/s and ms per
step, with the peak memory and the model FLOPs utilisation (MFU): the FLOPs of one step, counted
by ``torch.utils.flop_counter.FlopCounterMode``, over the step time and over the peak matmul rate
this script measures on the same device and dtype in the same run. Where ``transformers`` is
installed, ``ViTMAEForPreTraining`` of the same size is timed in the same run. The stages' timed
steps take turns, one step of each per round, so that a busy minute on a shared machine slows
every stage alike and the ratio between them holds. ``--profile ROWS`` then prints where each
stage's step goes, operator by operator. Under torchrun every process trains its own batch in DDP,
or with ``--fsdp`` sharded, and the peak memory of every rank is reported. The last line printed
(rank 0) is one JSON object.

    python benchmarks/bench_train.py --model pretrain_mae_base_patch16_224 --batch_size 8 --amp bf16 --device cpu
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/bench_train.py --model pretrain_mae_large_patch16_224 \
        --batch_size 2 --amp none --device cpu --stages pretrain --fsdp --grad_checkpointing
"""
import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

# On a shared CPU, OpenMP threads that spin while waiting for a preempted sibling made steps up
# to 70x slower here; sleeping waits cost little. Must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import timm  # noqa: E402

import modeling_pretrain  # noqa: E402,F401  registers the pretrain_mae_* models
import utils  # noqa: E402
from training import precision  # noqa: E402
from training.checkpoint import TrainingState  # noqa: E402
from training.config import optimizer_of  # noqa: E402
from training.loop import optimizer_step  # noqa: E402
from masking_generator import random_masks  # noqa: E402
from modeling_finetune import create_finetune_model  # noqa: E402
from optim_factory import add_optimizer_args, create_optimizer  # noqa: E402
from training.performance import fused_attention_is_faster, use_fastest_attention  # noqa: E402
from training.wrapping import Wrapping, unwrap_model, wrap_model  # noqa: E402

MATMUL_DTYPES = {"none": torch.float32, **precision.AMP_DTYPES}  # the step's dtype under each --amp
STAGES = ("pretrain", "finetune")
HF_STAGE = "vitmae_pretrain"
PROBE = "matmul"  # the peak-rate probe, timed before and between the training steps

LossFn = Callable[[nn.Module], torch.Tensor]
Step = Callable[[], torch.Tensor]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pretrain_mae_base_patch16_224",
                        help="pretraining model; finetuning times the ViT of the same size (vit_*)")
    parser.add_argument("--batch_size", default=8, type=int, help="images per step")
    precision.add_amp_arg(parser, default="bf16", help="precision of the step")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the model (the same switch the run_* scripts have)")
    parser.add_argument("--fsdp", action="store_true", help="shard the model over the processes (FSDP2)")
    parser.add_argument("--grad_checkpointing", action="store_true", help="recompute activations in the backward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stages", default=list(STAGES), nargs="+", choices=STAGES, help="what to time")
    parser.add_argument("--vitmae", action=argparse.BooleanOptionalAction, default=True,
                        help="also time transformers' ViTMAEForPreTraining when it is installed")
    parser.add_argument("--warmup", default=3, type=int, help="untimed steps first (compilation happens here)")
    parser.add_argument("--steps", default=10, type=int, help="timed steps; the median is reported")
    parser.add_argument("--profile", default=0, type=int, metavar="ROWS",
                        help="after timing, profile 3 steps of each stage and print its ROWS costliest operators")
    parser.add_argument("--input_size", default=224, type=int)
    parser.add_argument("--mask_ratio", default=0.75, type=float)
    parser.add_argument("--num_classes", default=1000, type=int, help="finetuning head width")
    parser.add_argument("--lr", default=1.0e-4, type=float, help="any positive lr: only the cost is measured")
    add_optimizer_args(parser, weight_decay=0.05, betas=(0.9, 0.95))
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- measuring


def timed(step: Step, device: torch.device) -> float:
    """Wall time of one call; the device is drained around it, never inside it."""
    torch.get_device_module(device).synchronize(device)
    start = time.perf_counter()
    step()
    torch.get_device_module(device).synchronize(device)
    return time.perf_counter() - start


def take_turns(steps: Dict[str, Step], device: torch.device, rounds: int) -> Dict[str, List[float]]:
    """Wall times of ``rounds`` calls of every step, one call of each per round, so that another
    process slowing a shared machine for a while slows all of them alike."""
    seconds: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            seconds[name].append(timed(step, device))
    return seconds


def matmul_probe(device: torch.device, amp: str) -> Tuple[Step, int]:
    """A large square matmul in the step's dtype and its FLOPs. Its fastest run is the ceiling MFU
    is measured against, taken on this machine now rather than from a datasheet."""
    size = 8192 if device.type == "cuda" else 2048
    dtype = MATMUL_DTYPES[amp]
    a = torch.randn(size, size, device=device, dtype=dtype)  # random, not zeros: zeros run faster
    b = torch.randn(size, size, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * size**3


def count_flops(step: Step) -> int:
    """FLOPs of one eager step. Attention runs as plain matmuls here because CPU's fused attention
    kernel has no FLOP formula; counted that way every device reports the same number."""
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


PROFILED_STEPS = 3  # at most: no more than the timed ones (the profiler's own parsing takes seconds a step on CPU)


def profile_table(step: Step, device: torch.device, rows: int, steps: int) -> str:
    """The ``rows`` operators with the most self time on the device over ``steps`` steps (on a GPU
    the kernels' time; the table's CPU columns then show what the host spent launching them, so it
    tells a GPU-bound step from a host-bound one)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        torch.get_device_module(device).synchronize(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows)


def allocated_bytes(device: torch.device) -> int:
    """CUDA: bytes the allocator holds for tensors now. CPU: 0 (no per-tensor accounting)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def step_peak_bytes(step: Step, device: torch.device) -> int:
    """CUDA: how far one call of ``step`` raises the allocator's peak above what was held before it.
    CPU: the process's peak resident set, which only grows and covers every stage built so far."""
    if device.type != "cuda":
        step()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    held = allocated_bytes(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    return torch.cuda.max_memory_allocated(device) - held


# ----------------------------------------------------------------------------- training steps


def train_step(state: TrainingState, loss_fn: LossFn, device: torch.device, amp: str) -> Step:
    """One step as ``training.loop.train_epoch`` takes it between progress lines; the loss stays on the device."""

    def step() -> torch.Tensor:
        with precision.autocast(device, amp):
            loss = loss_fn(state.model)
        state.scaler.scale(loss).backward()
        optimizer_step(state, clip_grad=None, measure_norm=False)  # as the steps between progress lines
        return loss.detach()

    return step


def pretrain_loss(imgs: torch.Tensor, masks: torch.Tensor) -> LossFn:
    num_masked = int(masks[0].sum())  # read once here, so the step never waits for the device

    def loss_fn(model: nn.Module) -> torch.Tensor:
        pred = model(imgs, masks, num_masked)  # (B, num_masked, p*p*3)
        return unwrap_model(model).forward_loss(imgs, pred, masks)

    return loss_fn


def finetune_loss(imgs: torch.Tensor, labels: torch.Tensor) -> LossFn:
    return lambda model: F.cross_entropy(model(imgs), labels)


def vitmae_loss(imgs: torch.Tensor) -> LossFn:
    return lambda model: model(pixel_values=imgs).loss  # masks drawn inside, on the device


def vitmae_attention(device: torch.device, amp: str) -> str:
    """The transformers attention matching ours: SDPA where we run it, its eager matmul-softmax
    path where we run timm's, so the ratio compares the models and not the attention kernels."""
    return "sdpa" if fused_attention_is_faster(device, amp) else "eager"


def vitmae_like(mae: modeling_pretrain.PretrainVisionTransformer, mask_ratio: float, attention: str) -> nn.Module:
    """transformers' ``ViTMAEForPreTraining`` with the sizes of ``mae`` and the given attention."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    encoder, decoder = mae.blocks[0], mae.decoder_blocks[0]
    config = ViTMAEConfig(
        image_size=mae.patch_embed.img_size[0],
        patch_size=mae.patch_size,
        hidden_size=mae.embed_dim,
        num_hidden_layers=len(mae.blocks),
        num_attention_heads=encoder.attn.num_heads,
        intermediate_size=encoder.mlp.fc1.out_features,
        decoder_hidden_size=mae.decoder_embed.out_features,
        decoder_num_hidden_layers=len(mae.decoder_blocks),
        decoder_num_attention_heads=decoder.attn.num_heads,
        decoder_intermediate_size=decoder.mlp.fc1.out_features,
        mask_ratio=mask_ratio,
        layer_norm_eps=1e-6,
        attn_implementation=attention,
    )
    return ViTMAEForPreTraining(config)


def finetune_name(pretrain_name: str) -> str:
    """``pretrain_mae_base_patch16_224`` -> timm's ``vit_base_patch16_224``."""
    return pretrain_name.replace("pretrain_mae_", "vit_", 1)


class Stage(NamedTuple):
    """A model ready to be timed, with what its figures need besides the step times."""

    step: Step  # one training step of the (compiled) model, warmed up
    flops: int  # of one eager step
    held_bytes: int  # CUDA memory the stage holds between steps: weights, optimizer state


def prepare_stage(model: nn.Module, loss_fn: LossFn, args: argparse.Namespace, device: torch.device) -> Stage:
    """FLOPs from one eager step, then the (compiled) model's warm-up steps."""
    before = allocated_bytes(device)
    model.to(device).train()
    use_fastest_attention(model, device, args.amp)
    if args.grad_checkpointing:  # timm's switch, or transformers' for ViTMAE
        enable = getattr(model, "set_grad_checkpointing", None) or model.activation_checkpointing_enable
        enable()
    wrapping = Wrapping(fsdp=args.fsdp, compile=args.compile, amp=args.amp, distributed=utils.get_world_size() > 1)
    wrapped = wrap_model(model, device, wrapping)
    state = TrainingState(wrapped, create_optimizer(optimizer_of(args), model, device),
                          precision.make_grad_scaler(device, args.amp))
    eager = TrainingState(unwrap_model(wrapped), state.optimizer, state.scaler)  # FLOPs are counted uncompiled
    flops = count_flops(train_step(eager, loss_fn, device, args.amp))
    step = train_step(state, loss_fn, device, args.amp)
    for _ in range(args.warmup):
        step()
    torch.get_device_module(device).synchronize(device)
    return Stage(step, flops, allocated_bytes(device) - before)


def stage_figures(stages: Dict[str, Stage], seconds: Dict[str, List[float]], args: argparse.Namespace,
                  device: torch.device, peak_flops: float) -> Dict[str, Dict[str, float]]:
    """Every stage's figures from its median step time. Its peak memory is what it holds between
    steps plus how far one more step raises the allocator's peak (on CPU the process's peak)."""
    results = {}
    for name, stage in stages.items():
        median = statistics.median(seconds[name])
        peak = torch.tensor(float(stage.held_bytes + step_peak_bytes(stage.step, device)), device=device)
        per_rank = [value / 2**30 for value in utils.all_gather_floats(peak)]
        results[name] = {
            "images_per_s": args.batch_size * utils.get_world_size() / median,
            "ms_per_step": median * 1e3,
            "gflop_per_image": stage.flops / args.batch_size / 1e9,
            "mfu": stage.flops / median / peak_flops,
            "peak_mem_gib": max(per_rank),
            "peak_mem_gib_per_rank": per_rank,
        }
    return results


def build_stages(args: argparse.Namespace, device: torch.device) -> Dict[str, Stage]:
    """Every asked stage on one fixed batch made on the device (no input pipeline)."""
    utils.seed_everything(0)
    imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)  # (B, 3, H, W)
    mae = timm.create_model(args.model, img_size=args.input_size)
    stages = {}
    if "pretrain" in args.stages:
        masks = random_masks(args.batch_size, mae.patch_embed.num_patches, args.mask_ratio, device=device)  # (B, N)
        stages["pretrain"] = prepare_stage(mae, pretrain_loss(imgs, masks), args, device)
    if "pretrain" in args.stages and args.vitmae and utils.get_world_size() == 1 and not args.fsdp \
            and importlib.util.find_spec("transformers"):
        hf_model = vitmae_like(mae, args.mask_ratio, vitmae_attention(device, args.amp))
        stages[HF_STAGE] = prepare_stage(hf_model, vitmae_loss(imgs), args, device)
    if "finetune" in args.stages:
        vit = create_finetune_model(finetune_name(args.model), args.num_classes, args.input_size)
        labels = torch.randint(args.num_classes, (args.batch_size,), device=device)  # (B,)
        stages["finetune"] = prepare_stage(vit, finetune_loss(imgs, labels), args, device)
    return stages


def summary_line(stage: str, figures: Dict[str, float]) -> str:
    return (f"{stage:>16}: {figures['images_per_s']:9.1f} images/s  {figures['ms_per_step']:9.1f} ms/step  "
            f"{figures['gflop_per_image']:6.1f} GFLOP/image  MFU {100 * figures['mfu']:5.1f}%  "
            f"peak mem {figures['peak_mem_gib']:.2f} GiB")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main(args: argparse.Namespace) -> Dict[str, Any]:
    device = utils.init_distributed(args.device, group_of_one=args.fsdp)  # as the scripts do (on CPU: malloc)
    try:
        return measure(args, device)
    finally:
        utils.cleanup_distributed()


def measure(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """Every figure of the report, printed (rank 0) and returned."""
    probe, probe_flops = matmul_probe(device, args.amp)
    probe_seconds = take_turns({PROBE: probe}, device, rounds=11)[PROBE][2:]  # 2 to warm up
    stages = build_stages(args, device)
    seconds = take_turns({**{name: stage.step for name, stage in stages.items()}, PROBE: probe}, device, args.steps)
    peak_flops = probe_flops / min(probe_seconds + seconds.pop(PROBE))
    results = stage_figures(stages, seconds, args, device, peak_flops)
    report: Dict[str, Any] = {
        "model": args.model, "batch_size": args.batch_size, "amp": args.amp, "compile": args.compile,
        "world_size": utils.get_world_size(), "fsdp": args.fsdp, "grad_checkpointing": args.grad_checkpointing,
        "device": device_name(device), "torch": torch.__version__,
        "fused_attention": fused_attention_is_faster(device, args.amp),
        "peak_matmul_tflops": peak_flops / 1e12, "results": results,
    }
    if HF_STAGE in results:
        report["speedup_vs_vitmae"] = results["pretrain"]["images_per_s"] / results[HF_STAGE]["images_per_s"]
    profiled = min(PROFILED_STEPS, args.steps)
    tables = {name: profile_table(stage.step, device, args.profile, profiled) for name, stage in stages.items()} \
        if args.profile else {}
    if utils.is_main_process():
        print_report(report, args, tables)
    return report


def print_report(report: Dict[str, Any], args: argparse.Namespace, tables: Dict[str, str]) -> None:
    sharing = "FSDP" if args.fsdp else "DDP"
    layout = f"{report['world_size']} x {sharing} on " if args.fsdp or report["world_size"] > 1 else ""
    print(f"{args.model} batch {args.batch_size} {args.amp} {'compiled' if args.compile else 'eager'} on "
          f"{layout}{report['device']}{', activation checkpointing' if args.grad_checkpointing else ''}; "
          f"{'fused' if report['fused_attention'] else 'matmul-softmax'} attention; "
          f"measured {args.amp} matmul peak {report['peak_matmul_tflops']:.3f} TFLOP/s")
    for stage, figures in report["results"].items():
        print(summary_line(stage, figures))
    if "speedup_vs_vitmae" in report:
        print(f"pretraining images/s over ViTMAEForPreTraining's: {report['speedup_vs_vitmae']:.2f}x")
    for name, table in tables.items():
        print(f"{name}: the {args.profile} operators with the most self time over 3 steps")
        print(table)
    print(json.dumps(report))


if __name__ == "__main__":
    main(parse_args())
