"""The benchmarks run end to end on a tiny model (so they cannot rot), and the fast settings they
time (bf16 autocast, torch.compile) compute the same MAE loss as fp32 eager on the same batch."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import timm
import torch

import modeling_pretrain  # noqa: F401  (registers the pretrain_mae_* names with timm)
from masking_generator import random_masks
from training import precision
from training.performance import use_fastest_attention
from training.wrapping import Wrapping, unwrap_model, wrap_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_data  # noqa: E402
import bench_max_batch  # noqa: E402
import bench_signal_check  # noqa: E402
import bench_train  # noqa: E402

TINY = ["--model", "pretrain_mae_tiny_patch16_224", "--batch_size", "2", "--input_size", "32",
        "--warmup", "1", "--steps", "1", "--device", "cpu", "--no-vitmae"]


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_bench_train_prints_all_figures_as_its_last_line_after_the_profile_of_each_step(capsys):
    """Our pretraining and finetuning steps, and ViTMAE's beside ours where transformers is installed,
    all recomputing activations (ViTMAE's path differs there: its own switch)."""
    vitmae = importlib.util.find_spec("transformers") is not None
    # full precision: on CPUs without bf16 matmul units (Zen 3) the bf16 peak probe alone takes minutes
    argv = [arg for arg in TINY if arg != "--no-vitmae"] + ["--amp", "none", "--grad_checkpointing", "--profile", "40"]
    bench_train.main(bench_train.parse_args(argv))
    out = capsys.readouterr().out
    report = last_json_line(out)
    stages = {"pretrain", "finetune", *([bench_train.HF_STAGE] if vitmae else [])}
    assert set(report["results"]) == stages and report["grad_checkpointing"]
    for stage in stages:
        table = out[out.index(f"{stage}: the 40 operators"):]
        assert "aten::addmm" in table  # every Linear of the step, forward
        assert "aten::_fused_adamw_" in table  # the optimizer is part of the profiled step
    assert report["fused_attention"] is True  # fp32 on CPU keeps F.scaled_dot_product_attention
    for figures in report["results"].values():
        assert figures["images_per_s"] > 0 and figures["ms_per_step"] > 0 and figures["peak_mem_gib"] > 0
        assert 0 < figures["mfu"] < 1.5  # a step cannot beat the matmul peak by much
    # the finetuning step runs every patch through the encoder, pretraining a quarter of them
    assert report["results"]["finetune"]["gflop_per_image"] > report["results"]["pretrain"]["gflop_per_image"]
    assert not vitmae or report["speedup_vs_vitmae"] > 0


def test_bench_train_times_a_sharded_step_with_activation_checkpointing(capsys):
    """One process here: FSDP over a group of one; the figures of every rank come back."""
    report = bench_train.main(bench_train.parse_args(TINY + ["--amp", "none", "--stages", "pretrain", "--fsdp",
                                                             "--grad_checkpointing"]))
    assert last_json_line(capsys.readouterr().out) == report
    assert report["fsdp"] and report["grad_checkpointing"] and report["world_size"] == 1
    figures = report["results"]["pretrain"]
    assert figures["images_per_s"] > 0 and len(figures["peak_mem_gib_per_rank"]) == 1


def test_the_largest_batch_is_found_by_doubling_then_bisection(monkeypatch):
    """Batches up to 23 fit: doubling from 16 fails at 32, then halving the gap finds 23 exactly
    (the first failing batch, 24, is within one of it)."""
    monkeypatch.setattr(bench_max_batch, "fits", lambda name, batch, args, device: batch <= 23)
    args = bench_max_batch.parse_args(["--start_batch", "16"])
    found = bench_max_batch.largest_batch(TINY[1], args, torch.device("cpu"))
    assert found == {"largest_batch": 23, "first_failing": 24, "tries": [16, 32, 24, 20, 22, 23]}


def test_bench_max_batch_trains_sharded_steps_up_to_the_cap_and_times_them(capsys):
    """On a CPU nothing runs out of memory, so the doubling stops at ``--max_batch``."""
    argv = ["--models", TINY[1], "--device", "cpu", "--amp", "none", "--fsdp", "--grad_checkpointing",
            "--input_size", "32", "--start_batch", "2", "--max_batch", "4", "--steps", "1", "--timed_steps", "1"]
    [report] = bench_max_batch.main(bench_max_batch.parse_args(argv))
    assert last_json_line(capsys.readouterr().out) == {"largest_batches": [report]}
    assert report["tries"] == [2, 4] and report["largest_batch"] == 4 and report["first_failing"] is None
    assert report["images_per_s"] > 0 and report["peak_mem_gib"] > 0


def test_timed_steps_take_turns():
    """One step of each per round, so a slow spell on a shared machine hits every stage."""
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("pretrain", "vitmae_pretrain", "matmul")}
    seconds = bench_train.take_turns(steps, torch.device("cpu"), rounds=3)
    assert calls == ["pretrain", "vitmae_pretrain", "matmul"] * 3
    assert {name: len(times) for name, times in seconds.items()} == dict.fromkeys(steps, 3)


def test_bench_data_names_the_fastest_path(capsys):
    bench_data.main(bench_data.parse_args(["--num_images", "3", "--repeats", "1", "--device", "cpu"]))
    report = last_json_line(capsys.readouterr().out)
    assert {"pil", "torchvision", "device"} <= set(report["per_worker_images_per_s"])
    assert report["device_decoder_cpu_side_images_per_s"] > 0
    assert report["fastest_cpu_path"] in set(report["per_worker_images_per_s"]) - {"device"}  # it decodes nothing


def test_bench_data_times_the_finetuning_pipeline_through_a_loader(capsys):
    argv = ["--stage", "finetune", "--num_images", "4", "--repeats", "1", "--device", "cpu", "--num_workers", "1",
            "--batch_size", "2"]
    bench_data.main(bench_data.parse_args(argv))
    report = last_json_line(capsys.readouterr().out)
    assert report["stage"] == "finetune" and set(report["per_worker_images_per_s"]) == {"pil"}
    assert report["loader_1_workers_images_per_s"]["pil"] > 0


def test_bench_signal_check_times_steps_with_and_without_the_agreement(capsys):
    args = bench_signal_check.parse_args(["--model", "pretrain_mae_tiny_patch16_224", "--input_size", "32",
                                          "--steps", "1", "--calls", "10"])
    report = bench_signal_check.main(args)
    assert last_json_line(capsys.readouterr().out) == report
    assert report["world_size"] == 1 and report["step_s"] > 0 and report["step_with_check_s"] > 0
    assert 0 < report["agreement_us"] < 1e6 * report["step_s"]  # one process: a flag read, no collective


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    model = timm.create_model("pretrain_mae_tiny_patch16_224", img_size=64, depth=2).eval()
    imgs = torch.randn(4, 3, 64, 64)  # (B, 3, H, W)
    masks = random_masks(4, 16, 0.75, generator=torch.Generator().manual_seed(0))  # (B, N)
    return model, imgs, masks


def mae_loss(model: torch.nn.Module, imgs: torch.Tensor, masks: torch.Tensor, amp: str) -> float:
    with torch.no_grad(), precision.autocast(imgs.device, amp):
        pred = model(imgs, masks, int(masks[0].sum()))
        return float(unwrap_model(model).forward_loss(imgs, pred, masks))


def test_bf16_autocast_gives_the_fp32_loss(batch):
    model, imgs, masks = batch
    reference = mae_loss(model, imgs, masks, "none")
    assert mae_loss(model, imgs, masks, "bf16") == pytest.approx(reference, rel=1e-2)


def test_compiled_model_gives_the_eager_loss(device):
    """Forward only, so inductor compiles one small graph of a one-block model (its C++ build is
    most of the test's time); on a GPU under bf16 autocast too, as the GPU runs train, where on a
    CPU a second graph would double the build."""
    torch.manual_seed(0)
    model = timm.create_model("pretrain_mae_tiny_patch16_224", img_size=32, depth=1, decoder_depth=1).to(device).eval()
    imgs = torch.randn(4, 3, 32, 32, device=device)  # (B, 3, H, W)
    masks = random_masks(4, 4, 0.75, generator=torch.Generator().manual_seed(0)).to(device)  # (B, N)
    reference = mae_loss(model, imgs, masks, "none")
    compiled = wrap_model(model, device, Wrapping(compile=True))
    assert unwrap_model(compiled) is model
    assert mae_loss(compiled, imgs, masks, "none") == pytest.approx(reference, rel=1e-4)
    if device.type == "cuda":
        assert mae_loss(compiled, imgs, masks, "bf16") == pytest.approx(reference, rel=1e-2)


def test_bf16_on_cpu_switches_to_timm_matmul_softmax_attention_with_the_same_loss(batch):
    """The switch changes the kernel, not the function: the loss of the unfused bf16 path is the
    fused fp32 one."""
    model, imgs, masks = batch
    attentions = [m for m in model.modules() if isinstance(m, timm.layers.Attention)]
    reference = mae_loss(model, imgs, masks, "none")
    use_fastest_attention(model, torch.device("cpu"), "bf16")
    try:
        assert attentions and not any(attention.fused_attn for attention in attentions)
        assert mae_loss(model, imgs, masks, "bf16") == pytest.approx(reference, rel=1e-2)
    finally:
        use_fastest_attention(model, torch.device("cpu"), "none")
    assert all(attention.fused_attn for attention in attentions)
