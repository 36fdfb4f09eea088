"""The evaluation during pretraining (``--eval_data_set``): it logs what the standalone k-NN and probe
scripts print for the same checkpoints, changes no weight (with and without it, and across a kill
and relaunch, the run ends bitwise where ``uninterrupted`` ends), repeats no evaluation after a
relaunch, and a failure in it is every rank's; and the pictures of the features."""
import json
import os
import random
import signal
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

import modeling_pretrain  # noqa: F401  (registers the pretrain_mae_* models with timm)
import run_knn_eval
import run_linear_probe
from helpers import (
    PRETRAIN,
    RECORDER,
    assert_bitwise_equal,
    final_state,
    follow,
    run_ranks,
    start_ranks,
    tiny_mae,
    wait_for_step,
)
from evaluation.online import rngs_kept
from visualization import cls_attention, patch_pca

# 64 labelled images a split (synthetic), an evaluation after every epoch, and every epoch's checkpoint kept
ONLINE = ["--eval_data_set", "synthetic", "--eval_num_samples", "64", "--eval_freq", "1", "--save_ckpt_freq", "1"]
STANDALONE = ["--model", "vit_tiny_patch16_224", "--input_size", "32", "--num_workers", "0", "--device", "cpu",
              "--data_set", "synthetic", "--num_samples", "64"]


def log_lines(out: Path) -> List[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def standalone_figures(checkpoint: Path, out: Path) -> dict:
    """What ``run_knn_eval.py`` and ``run_linear_probe.py --protocol sweep`` report for ``checkpoint``."""
    knn = run_knn_eval.main(run_knn_eval.get_args_parser().parse_args(
        [*STANDALONE, "--finetune", str(checkpoint), "--output_dir", str(out / "knn")]))
    probe = run_linear_probe.main(run_linear_probe.get_args_parser().parse_args(
        [*STANDALONE, "--protocol", "sweep", "--finetune", str(checkpoint), "--output_dir", str(out / "probe")]))
    return {"knn_acc1": knn["knn_acc1"]["20"], "probe_acc1": probe["acc1"]}


def test_killed_and_relaunched_with_evaluation_it_logs_the_scripts_figures_once_and_ends_bitwise_equal(
        uninterrupted, tmp_path):
    """2 processes, each evaluated epoch's features split between them; killed (SIGKILL, the whole
    run) in epoch 1, once epoch 0 was evaluated and logged, then relaunched."""
    out, records = tmp_path / "out", tmp_path / "records"
    command = [*PRETRAIN, *ONLINE, "--output_dir", str(out)]
    processes = start_ranks(command, records, script=RECORDER)
    wait_for_step(follow(records / "output_rank0.txt", processes[0]), epoch=1, step=1, seen=[])
    for process in processes:  # each rank and its loader worker
        os.killpg(process.pid, signal.SIGKILL)
    for process in processes:
        process.join()
    first = (records / "output_rank0.txt").read_text()
    assert first.count("evaluation after epoch 0:") == 1, first[-3000:]
    assert [line["epoch"] for line in log_lines(out)] == [0]
    outputs = run_ranks(command, records, script=RECORDER)
    relaunch = outputs[0][1]
    assert [code for code, _ in outputs] == [0, 0], outputs
    assert "at epoch 1" in relaunch and "evaluation after epoch 0" not in relaunch, relaunch[-3000:]
    assert relaunch.count("evaluation after epoch 1:") == 1, relaunch[-3000:]
    logged = log_lines(out)
    assert [line["epoch"] for line in logged] == [0, 1]  # each epoch's line, and its evaluation, once
    for straight, evaluated in zip(final_state(uninterrupted / "out"), final_state(out)):
        assert_bitwise_equal(straight, evaluated)  # the evaluation changed no weight
    for line in logged:
        standalone = standalone_figures(out / f"checkpoint-{line['epoch']}.pth", tmp_path / f"scripts{line['epoch']}")
        for name, value in standalone.items():
            assert line[name] == pytest.approx(value, abs=0.1), (line["epoch"], name)


@pytest.mark.parametrize("fault, probe, line", [
    ("eval_error", "--no-eval_probe",
     "error: on rank 1: the evaluation after epoch 0 failed (RuntimeError: CUDA error: an illegal memory access"),
    ("probe_error", "--eval_probe",  # in the sweep, whose ranks each train a share of the heads
     "error: the evaluation after epoch 0 failed (RunFailure: on rank 1: CUDA error: an illegal memory access"),
])
def test_an_evaluation_failing_on_one_rank_stops_every_rank_after_the_epochs_checkpoint(fault, probe, line, tmp_path):
    out = tmp_path / "out"
    outputs = run_ranks([*PRETRAIN, *ONLINE, "--eval_num_samples", "16", probe, "--output_dir", str(out)],
                        tmp_path / "records", fault)
    for rank, (code, text) in enumerate(outputs):
        assert code == 1 and text.count(line) == 1 and "Traceback" not in text, f"rank {rank}:\n{text[-3000:]}"
    assert torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)["epoch"] == 0
    assert not (out / "log.txt").exists()  # the epoch's line waits for its evaluation


def test_patch_pca_gives_sklearns_principal_components_up_to_sign():
    tokens = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(0)) * torch.linspace(3, 0.1, 24)
    ours = patch_pca(tokens).reshape(-1, 3).double()
    theirs = torch.from_numpy(PCA(n_components=3).fit_transform(tokens.reshape(-1, 24).double().numpy()))
    for component in range(3):
        signed = [sign * theirs[:, component] for sign in (1, -1)]
        scaled = [(column - column.min()) / (column.max() - column.min()) for column in signed]
        assert min(float((ours[:, component] - option).abs().max()) for option in scaled) < 1e-5


def test_the_cls_attention_is_what_timms_attention_computes():
    """timm's unfused path keeps the softmax weights, which ``attn_drop`` receives: the cls token's
    row of the last block's, over the patches, is what the pictures show."""
    model = tiny_mae(img_size=32)
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = []
    last = model.blocks[-1].attn
    last.fused_attn = False
    last.attn_drop.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    model.encode(imgs)
    torch.testing.assert_close(cls_attention(model, imgs), seen[0][:, :, 0, 1:])


def test_the_evaluation_puts_back_every_generator_the_training_draws_from(device):
    def draws():
        return (torch.rand(3).tolist(), torch.rand(3, device=device).tolist(), np.random.rand(3).tolist(),
                random.random())

    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    expected = draws()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    with rngs_kept(device):
        draws()
        torch.manual_seed(6), np.random.seed(6), random.seed(6)
    assert draws() == expected
