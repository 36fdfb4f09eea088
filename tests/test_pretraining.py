"""End-to-end pretraining on CPU: tiny model, tiny synthetic images."""
import copy
import json
import math
import os
import shlex

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import modeling_pretrain  # noqa: F401
import run_mae_pretraining
import utils
from training import precision
from training.checkpoint import TrainingState
from training.optimizer_state import load_optimizer_state
from training.config import optimizer_of, resolve_pretraining, training_values
from training.loop import Stepping, clip_or_measure_grad_norm, train_epoch
from training.lr_schedule import Schedule, lr_at
from training.settings import pick
from engine_for_pretraining import reconstruction_loss
from helpers import TINY_MAE
from masking_generator import random_masks
from optim_factory import create_optimizer

TINY = [*TINY_MAE, "--data_set", "synthetic", "--num_samples", "16", "--batch_size", "8", "--warmup_epochs", "1",
        "--blr", "1e-3", "--print_freq", "1"]
SEED_COMMAND = (
    "--data_path {data} --mask_ratio 0.75 --model pretrain_mae_base_patch16_224 --batch_size 128 --opt adamw "
    "--opt_betas 0.9 0.95 --warmup_epochs 40 --epochs 1600 --output_dir {out}"
)


def parse(argv):
    return run_mae_pretraining.get_args_parser().parse_args(argv)


def run(argv):
    run_mae_pretraining.main(parse(argv))


def test_seed_readme_command_parses(tmp_path):
    args = parse(shlex.split(SEED_COMMAND.format(data=tmp_path, out=tmp_path / "out")) + ["--local-rank=3"])
    assert args.mask_ratio == 0.75 and args.batch_size == 128 and args.epochs == 1600
    assert args.opt == "adamw" and args.opt_betas == [0.9, 0.95] and args.warmup_epochs == 40
    assert args.local_rank == 3
    assert parse(["--local_rank", "5"]).local_rank == 5


def test_blr_scales_with_effective_batch():
    args = parse(["--batch_size", "64", "--accum_iter", "2", "--blr", "1.5e-4"])
    settings = training_values(args, world_size=8)
    assert settings["lr"] == pytest.approx(1.5e-4 * 64 * 2 * 8 / 256)


def test_settings_are_resolved_once_then_only_read(tmp_path):
    """One call decides every derived setting, from the command line alone, and writes nothing."""
    out = tmp_path / "out"
    args = resolve_pretraining(parse(["--batch_size", "8", "--accum_iter", "2", "--blr", "1e-3", "--device", "cpu",
                                      "--output_dir", str(out)]))
    assert args.eff_batch_size == 16 and args.lr == pytest.approx(1e-3 * 16 / 256)
    assert args.log_dir == str(out / "tensorboard") and args.data_set == "synthetic" and args.amp == "none"
    assert (args.rank, args.world_size, args.distributed, args.in_chans) == (0, 1, False, 3)
    assert not out.exists()
    with pytest.raises(AttributeError, match="read only"):
        args.lr = 1.0


def test_lr_schedule_warmup_then_half_cosine():
    schedule = Schedule(lr=1.0, min_lr=0.1, warmup_epochs=10, epochs=110)
    assert lr_at(5, schedule) == pytest.approx(0.5)
    assert lr_at(10, schedule) == pytest.approx(1.0)
    assert lr_at(60, schedule) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert lr_at(110, schedule) == pytest.approx(0.1)


def test_two_epochs_write_checkpoint_log_pictures_and_resume(tmp_path):
    out = tmp_path / "out"
    run(TINY + ["--epochs", "2", "--output_dir", str(out)])
    assert {"checkpoint-1.pth", "checkpoint-last.pth", "log.txt", "reconstruction.png", "features.png"} <= set(
        os.listdir(out))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(math.isfinite(r["train_loss"]) and "train_lr" in r for r in records)

    checkpoint = torch.load(out / "checkpoint-1.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and isinstance(checkpoint["args"], dict)
    assert "decoder_pred.weight" in checkpoint["model"] and "mask_token" in checkpoint["model"]
    fresh = timm.create_model("pretrain_mae_tiny_patch16_224", img_size=32)
    fresh.load_state_dict(checkpoint["model"], strict=True)

    run(TINY + ["--epochs", "3", "--output_dir", str(out)])
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]  # resumed at epoch 2, not from scratch


def test_the_device_decoder_trains_as_the_pil_pipeline_does(tmp_path):
    """Same seed, same folder: the same crops (pixels within 1 of 255) and the same masks, so the
    same loss; the device decoder's batches also cross from a worker process to the step."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for index in range(8):
        coarse = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))  # (h, w, 3)
        coarse.resize((64, 48), Image.BICUBIC).save(tmp_path / "images" / f"{index}.jpg", quality=90)
    losses = {}
    for decoder, workers in (("pil", "0"), ("device", "1")):
        out = tmp_path / decoder
        run([*TINY, "--data_set", "image_folder", "--data_path", str(tmp_path / "images"), "--epochs", "1",
             "--batch_size", "4", "--decoder", decoder, "--num_workers", workers, "--output_dir", str(out)])
        losses[decoder] = json.loads((out / "log.txt").read_text().splitlines()[-1])["train_loss"]
    assert losses["device"] == pytest.approx(losses["pil"], rel=1e-3)


def test_the_step_masks_every_image_on_the_device_from_the_steps_seed(device):
    """The official count per image (4 of 16 patches visible at 0.75), a different subset per
    image, and the same masks whenever the step's seed repeats, which a resumed run relies on."""
    model = timm.create_model("pretrain_mae_tiny_patch16_224", img_size=64, depth=1, decoder_depth=1).to(device)
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[1].cpu()))
    loss_fn = reconstruction_loss(model, device, (0.5,) * 3, (0.25,) * 3, mask_ratio=0.75)
    batch = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8), torch.zeros(6)
    for step in (5, 5, 6):
        utils.seed_everything(0, 0, 2, step)  # seed, rank, epoch, step, as engine.train_epoch does
        assert torch.isfinite(loss_fn(batch))
    first, again, next_step = seen
    assert first.shape == (6, 16) and first.sum(dim=1).tolist() == [12] * 6
    assert len({tuple(row.tolist()) for row in first}) == 6
    assert torch.equal(first, again) and not torch.equal(first, next_step)


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = timm.create_model("pretrain_mae_tiny_patch16_224", img_size=32, depth=4)
    args = parse(["--lr", "1e-3", "--weight_decay", "0.0"])
    optimizer = create_optimizer(optimizer_of(args), model, torch.device("cpu"))
    imgs = torch.randn(8, 3, 32, 32).cumsum(dim=-1) / 8  # smooth, predictable images
    mask = random_masks(8, 4, 0.75, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(40):
        loss = model.forward_loss(imgs, model(imgs, mask), mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_adamw_is_fused_on_cpu_and_takes_the_textbook_first_step():
    """After one step Adam's bias-corrected moments are g and g^2, so AdamW moves each weight to
    w (1 - lr wd) - lr g / (|g| + eps) (Loshchilov & Hutter, Algorithm 2)."""
    lr, wd, eps = 0.1, 0.05, 1e-8
    model = torch.nn.Linear(3, 2)
    args = parse(["--lr", str(lr), "--weight_decay", str(wd), "--opt_eps", str(eps)])
    optimizer = create_optimizer(optimizer_of(args), model, torch.device("cpu"))
    assert optimizer.defaults["fused"] is True
    before = model.weight.detach().clone()
    grad = torch.tensor([[0.5, -2.0, 1e-3], [3.0, -0.25, 0.0]])
    model.weight.grad, model.bias.grad = grad.clone(), torch.zeros(2)
    optimizer.step()
    expected = before * (1 - lr * wd) - lr * grad / (grad.abs() + eps)
    torch.testing.assert_close(model.weight.detach(), expected)


@pytest.mark.parametrize("clip_grad, scale", [(None, 1.0), (6.5, 0.5), (26.0, 1.0)])
def test_the_gradient_norm_is_measured_and_only_clipped_when_asked(clip_grad, scale):
    """Gradients (3, 4) and (12,) have the total norm sqrt(9 + 16 + 144) = 13; clipping to
    6.5 halves them, and a limit above 13 or no limit leaves them as they are."""
    model = torch.nn.Linear(2, 1, bias=True)
    model.weight.grad, model.bias.grad = torch.tensor([[3.0, 4.0]]), torch.tensor([12.0])
    norm = clip_or_measure_grad_norm(model, clip_grad)
    assert float(norm) == pytest.approx(13.0)
    torch.testing.assert_close(model.weight.grad, scale * torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(model.bias.grad, scale * torch.tensor([12.0]))


@pytest.mark.parametrize("accum_iter, measured_at", [(1, [0, 4, 5]), (2, [3, 5])])
def test_only_the_updates_whose_norm_a_progress_line_shows_measure_it(accum_iter, measured_at, monkeypatch):
    """Six micro-steps, a progress line at steps 0, 4 and 5 (every 4th and the last). A line
    shows the norm of the latest update: with accumulation over 2, updates are at 1, 3 and 5,
    and the line at 4 shows step 3's, the one at 0 none yet, so step 1's is never measured."""
    args = parse([*TINY, "--print_freq", "4", "--accum_iter", str(accum_iter), "--lr", "1e-3"])
    args.rank, args.world_size, args.amp = 0, 1, "none"
    model = timm.create_model("pretrain_mae_tiny_patch16_224", img_size=32, depth=1, decoder_depth=1)
    optimizer = create_optimizer(optimizer_of(args), model, torch.device("cpu"))
    scaler = precision.make_grad_scaler(torch.device("cpu"), "none")
    imgs, masks = torch.randn(2, 3, 32, 32), torch.tensor([[True, True, True, False]] * 2)
    steps, measured = [], []
    total_norm = torch.nn.utils.get_total_norm

    def loss_fn(step):
        steps.append(step)
        return model.forward_loss(imgs, model(imgs, masks, 3), masks)

    def counting_norm(*norm_args, **norm_kwargs):
        measured.append(steps[-1])
        return total_norm(*norm_args, **norm_kwargs)

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", counting_norm)
    state = TrainingState(model, optimizer, scaler)
    stats = train_epoch(state, list(range(6)), loss_fn, device=torch.device("cpu"), epoch=0,
                        stepping=pick(Stepping, vars(args)), schedule=pick(Schedule, vars(args)))
    assert measured == measured_at and stats["grad_norm"] > 0


def test_resuming_an_unfused_optimizer_state_keeps_the_fused_kernel_and_the_trajectory():
    """States saved before AdamW ran fused on CPU carry ``fused=None``; resumed, the run keeps the
    fused kernel and takes the step the unfused optimizer would have taken."""
    args = parse(["--lr", "0.1", "--weight_decay", "0.05"])
    torch.manual_seed(0)
    saved, resumed = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    unfused = create_optimizer(optimizer_of(args), saved, torch.device("cpu"))
    for group in unfused.param_groups:
        group["fused"] = None  # as an older checkpoint has it
    grads = [(torch.randn(2, 3), torch.randn(2)) for _ in range(2)]

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad: tuple) -> None:
        model.weight.grad, model.bias.grad = (g.clone() for g in grad)
        optimizer.step()

    step(saved, unfused, grads[0])
    resumed.load_state_dict(saved.state_dict())
    fused = create_optimizer(optimizer_of(args), resumed, torch.device("cpu"))
    load_optimizer_state(fused, copy.deepcopy(unfused.state_dict()))  # as if read from disk
    assert all(group["fused"] for group in fused.param_groups)
    step(saved, unfused, grads[1])
    step(resumed, fused, grads[1])
    torch.testing.assert_close(resumed.state_dict(), saved.state_dict())


def test_two_ddp_processes_end_with_identical_weights(uninterrupted):
    """DDP keeps the ranks' weights equal: each rank of the shared 2-process run saved its own."""
    states = [torch.load(uninterrupted / "records" / f"weights_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    initial = timm.create_model("pretrain_mae_tiny_patch16_224", img_size=32).state_dict()
    assert not torch.equal(states[0]["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])
