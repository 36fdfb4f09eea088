"""Evaluation protocols on CPU: weighted k-NN, LARS, the linear probe and reconstruction pictures."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import modeling_pretrain  # noqa: F401  (registers the pretrain_mae_* models with timm)
import run_knn_eval
import run_linear_probe
import run_mae_vis
import run_synthetic_results
import utils
from evaluation.knn import knn_accuracy, knn_predict
from optim_factory import create_lars
from helpers import TINY_VIT, run_ranks

REPO = Path(__file__).resolve().parents[1]


def test_knn_votes_weigh_exp_similarity_over_temperature():
    """From a query at 0 degrees: one class-0 neighbour at 10 degrees, two class-1 neighbours at
    +-12 degrees, one class-2 at 90. The nearest alone says 0; with three, class 1 scores
    2 exp(cos 12 / 0.07) = 1.8 exp(cos 10 / 0.07), and the fourth adds only exp(0) to class 2."""
    def unit(degrees: float) -> list:
        return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]

    train = torch.tensor([unit(10), unit(12), unit(-12), unit(90)])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([unit(0)])
    predictions = knn_predict(train, labels, query, 3, [1, 3, 4], temperature=0.07)
    assert predictions[1].tolist() == [0] and predictions[3].tolist() == [1] and predictions[4].tolist() == [1]
    # a high temperature flattens the weights to a plain majority vote
    assert knn_predict(train, labels, query, 3, [3], temperature=100.0)[3].tolist() == [1]


def test_knn_accuracy_counts_each_k():
    """Two tight clusters; a query near cluster 0 but labelled 1 is wrong for every k."""
    train = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.9, 0.2]]) * 5  # scale is irrelevant: normalized
    accuracy = knn_accuracy(train, labels, test, torch.tensor([0, 1, 1]), 2, [1, 2], 0.07)
    assert accuracy == pytest.approx({1: 200 / 3, 2: 200 / 3})


def test_features_of_an_odd_dataset_are_extracted_once_on_two_processes(tmp_path):
    outputs = run_ranks([], tmp_path, script=REPO / "tests" / "knn_rank_features.py", timeout=240)
    assert [code for code, _ in outputs] == [0, 0], outputs
    reports = [json.loads((tmp_path / f"knn_rank{rank}.json").read_text()) for rank in range(2)]
    assert sorted(reports[0]["loaded"]) == [0, 2, 4, 6] and sorted(reports[1]["loaded"]) == [1, 3, 5]
    for report in reports:  # every rank holds all 7 features, in dataset order
        assert report["features"] == [float(i) for i in range(7)]
        assert report["labels"] == [i % 3 for i in range(7)]


def test_knn_eval_of_a_random_encoder_clips_k_to_the_training_set(tmp_path, capsys):
    argv = TINY_VIT + ["--num_samples", "21", "--batch_size", "8", "--output_dir", str(tmp_path)]
    record = run_knn_eval.main(run_knn_eval.get_args_parser().parse_args(argv))
    assert set(record["knn_acc1"]) == {"10", "20", "21"}  # 100 and 200 become all 21 images
    assert all(0 <= value <= 100 for value in record["knn_acc1"].values())
    logged = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])
    assert logged == record and json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == record


def test_lars_adapts_weight_matrices_only():
    """Two steps by hand: the weight's step is lr * 0.001 * |w| / |g| * g with momentum 0.9; the
    bias (1-D) takes plain SGD-momentum steps."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    optimizer = create_lars(layer, lr=0.5)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    weight_buffer, bias_buffer = torch.zeros_like(weight), torch.zeros_like(bias)
    for _ in range(2):
        grad_w, grad_b = torch.randn(3, 4), torch.randn(3)
        layer.weight.grad, layer.bias.grad = grad_w.clone(), grad_b.clone()
        optimizer.step()
        weight_buffer = 0.9 * weight_buffer + 0.001 * weight.norm() / grad_w.norm() * grad_w
        bias_buffer = 0.9 * bias_buffer + grad_b
        weight, bias = weight - 0.5 * weight_buffer, bias - 0.5 * bias_buffer
        torch.testing.assert_close(layer.weight.detach(), weight, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.bias.detach(), bias, rtol=1e-6, atol=1e-7)


def test_lars_with_weight_decay_takes_maes_step():
    """MAE's util/lars.py with decay 0.05: the weight's step is (g + 0.05 w) scaled by
    0.001 |w| / |g + 0.05 w|, as momentum; the bias takes g undecayed. timm's Lars divides by
    |g| + 0.05 |w| (+ eps) instead, which this would catch."""
    torch.manual_seed(1)
    layer = torch.nn.Linear(5, 2)
    optimizer = create_lars(layer, lr=0.3, weight_decay=0.05)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    grad_w, grad_b = torch.randn(2, 5), torch.randn(2)
    layer.weight.grad, layer.bias.grad = grad_w.clone(), grad_b.clone()
    optimizer.step()
    decayed = grad_w + 0.05 * weight
    expected = weight - 0.3 * (0.001 * weight.norm() / decayed.norm()) * decayed
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(layer.bias.detach(), bias - 0.3 * grad_b, rtol=1e-6, atol=1e-8)


def probe_argv(out: Path, *extra: str) -> list:
    return TINY_VIT + ["--num_samples", "32", "--batch_size", "16", "--epochs", "1", "--warmup_epochs", "1",
                     "--lr", "6.4", "--print_freq", "1", "--output_dir", str(out), *extra]


def test_linear_probe_trains_only_the_head(pretrained_mae, tmp_path):
    args = run_linear_probe.get_args_parser().parse_args(probe_argv(tmp_path, "--finetune", str(pretrained_mae)))
    assert not args.global_pool and args.weight_decay == 0 and args.blr == 0.1
    run_linear_probe.main(args)
    pretrained = torch.load(pretrained_mae, weights_only=True)["model"]
    probed = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["model"]
    encoder = {key[len("encoder."):]: value for key, value in probed.items() if key.startswith("encoder.")}
    assert encoder.keys() == {key for key in pretrained if not key.startswith(("decoder", "mask_token"))}
    for key, value in encoder.items():
        assert torch.equal(value, pretrained[key]), key
    assert probed["head.1.bias"].abs().sum() > 0  # trained: it starts at zero
    assert probed["head.0.num_batches_tracked"] == 2 and "head.0.weight" not in probed  # no affine

    stats = run_linear_probe.main(run_linear_probe.get_args_parser().parse_args(
        probe_argv(tmp_path / "eval", "--eval", "--resume", str(tmp_path / "checkpoint-last.pth"))))
    logged = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])
    assert stats["acc1"] == pytest.approx(logged["test_acc1"])


def test_probe_keeps_the_encoder_in_eval_mode():
    encoder = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, drop_path_rate=0.5)
    probe = run_linear_probe.LinearProbe(encoder, 10).train()
    assert probe.head.training and not any(module.training for module in probe.encoder.modules())
    assert not any(param.requires_grad for param in probe.encoder.parameters())
    imgs = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(probe.encoder(imgs), probe.encoder(imgs))  # drop path is off


def test_mae_vis_keeps_visible_patches_and_says_norm_pix(pretrained_mae, tmp_path):
    """A 48 px image through a 32 px norm-pixel checkpoint: a 3x3 grid, 2 patches visible."""
    pixels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    argv = [str(tmp_path / "photo.png"), str(tmp_path / "out"), "--model_path", str(pretrained_mae),
            "--input_size", "48", "--seed", "3", "--device", "cpu"]
    [path] = run_mae_vis.main(run_mae_vis.get_args_parser().parse_args(argv))
    assert path.name == "photo_mask0.75_seed3.png"
    picture = Image.open(path)
    assert "norm_pix_loss" in picture.text["Description"]
    grid_height, cell = 2 + 48 + 2, 48 + 2  # make_grid: 2 px padding around each panel
    assert picture.width == 2 + 4 * cell and picture.height > grid_height
    image = np.asarray(picture.convert("RGB"))[-grid_height:]  # the caption strip sits on top

    def panel(column: int) -> np.ndarray:
        return image[2:50, 2 + column * cell: 50 + column * cell]  # (48, 48, 3)

    original, masked_input, _, pasted = (panel(column) for column in range(4))
    assert np.array_equal(original, pixels)
    patches = [(slice(16 * r, 16 * r + 16), slice(16 * c, 16 * c + 16)) for r in range(3) for c in range(3)]
    visible = [patch for patch in patches if np.array_equal(masked_input[patch], pixels[patch])]
    assert len(visible) == 2  # int(9 * 0.25) patches stay visible
    for patch in visible:
        assert np.array_equal(pasted[patch], pixels[patch])
    for patch in patches:
        if patch not in visible:
            assert (masked_input[patch] == 128).all()  # hidden patches are grey


def test_mae_vis_refuses_a_missing_image_before_writing(pretrained_mae, tmp_path, capsys):
    argv = [str(tmp_path / "nothing"), str(tmp_path / "out"), "--model_path", str(pretrained_mae), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(run_mae_vis.main, run_mae_vis.get_args_parser().parse_args(argv))
    assert exit_info.value.code == 2 and "no image" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_results_script_runs_every_step_and_prints_the_table(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--num_samples", "32", "--input_size", "32", "--batch_size", "16",
            "--pretrain_epochs", "1", "--probe_epochs", "1", "--finetune_epochs", "1", "--num_workers", "0"]
    report = run_synthetic_results.main(run_synthetic_results.get_args_parser().parse_args(argv))
    rows = [line for line in report.splitlines() if line.startswith("| ") and "`python run_" in line]
    assert len(rows) == 9  # pretraining and eight evaluations (two of them the fast probe), each with its command
    assert (tmp_path / "results.md").read_text().strip() == report.strip()
    assert (tmp_path / "vis" / "synthetic_mask0.75_seed0.png").is_file()
    # Run again: the trained steps resume finished runs, only evaluate, and say so.
    again = run_synthetic_results.main(run_synthetic_results.get_args_parser().parse_args(argv))
    rerun = [line for line in again.splitlines() if line.startswith("| ") and "`python run_" in line]
    assert [row.split(" | ")[1] for row in rerun] == [row.split(" | ")[1] for row in rows]  # same top-1
    assert sum("(resumed)" in row for row in rerun) == 5  # pretraining, two probes, two finetunings


def test_mae_vis_refuses_an_encoder_only_checkpoint(pretrained_mae, tmp_path, capsys):
    state = torch.load(pretrained_mae, weights_only=True)["model"]
    encoder_only = tmp_path / "encoder.pth"
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}}, encoder_only)
    argv = ["synthetic", str(tmp_path / "out"), "--model_path", str(encoder_only), "--model",
            "pretrain_mae_tiny_patch16_224", "--input_size", "32", "--device", "cpu"]
    with pytest.raises(SystemExit):
        utils.exit_on_usage_error(run_mae_vis.main, run_mae_vis.get_args_parser().parse_args(argv))
    assert "no decoder" in capsys.readouterr().err and not (tmp_path / "out").exists()
