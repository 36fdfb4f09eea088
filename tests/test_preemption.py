"""Runs that survive the cluster and the user: preemption signals and Ctrl-C, SLURM requeues, step
checkpoints of earlier versions, and inputs that cannot stop a run (elastic restarts: test_sharding;
another number of processes: test_shards). Tiny model, gloo on CPU."""
import contextlib
import json
import os
import re
import signal
import time
from typing import List

import pytest
import torch
from PIL import Image

import engine_for_pretraining
import run_class_finetuning
import run_knn_eval
import run_mae_pretraining
import utils
from training.epoch_position import EpochStart, epoch_start
from helpers import (
    usage_error,
    PRETRAIN,
    TINY_VIT,
    assert_bitwise_equal,
    exit_codes,
    final_state,
    finish,
    launched_pids,
    on_slurm,
    run,
    start,
    torchrun,
    wait_for_step,
)

def test_ctrl_c_under_torchrun_and_again_while_saving_stops_once_and_the_relaunch_ends_bitwise_equal(
        uninterrupted, tmp_path):
    """Ctrl-C at the terminal (SIGINT to every process of the run, torchrun and its workers alike),
    then pressed again and again at the workers while they finish the step and write: one line,
    one stop at the step the ranks agreed on, a checkpoint that loads, exit 130, and the same
    command then ends where an uninterrupted run does. (A SIGTERM passed on by torchrun takes the
    same path: test_shards stops a 2-process run with one.)"""
    process = start(torchrun(tmp_path / "out"), tmp_path / "records")
    seen: List[str] = []
    wait_for_step(process.stdout, epoch=1, step=1, seen=seen)
    workers = launched_pids(process.pid)
    os.killpg(process.pid, signal.SIGINT)
    for _ in range(30):  # through the step's end, the agreement, the save and the exit
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        time.sleep(0.01)
    output = finish(process, seen)
    assert process.returncode != 0 and exit_codes(tmp_path / "records") == [130, 130], output[-3000:]
    stops = re.findall(r"^stopping on SIGINT \(Ctrl-C\) after epoch (\d+) step (\d+)/4: saved (\S+); relaunch the "
                       r"same command to continue$", output, re.MULTILINE)
    assert len(stops) == 1, output[-3000:]  # rank 0's line, once
    epoch, step, saved = stops[0]
    checkpoint = torch.load(saved, weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (int(epoch), int(step))
    assert checkpoint["samples_done"] == checkpoint["step"] * 4 * 2
    assert not list((tmp_path / "out").glob(".*.tmp"))
    output = run(torchrun(tmp_path / "out"), tmp_path / "records")
    assert f"resumed from {saved} at epoch {epoch} step {step}" in output
    for straight, resumed in zip(final_state(uninterrupted / "out"), final_state(tmp_path / "out")):
        assert_bitwise_equal(straight, resumed)


def test_requeue_asks_slurm_to_requeue_the_job_after_the_checkpoint(tmp_path, monkeypatch, capsys):
    """SLURM's ``--signal=USR1@120`` warning, here sent to this process during the second step (the
    handler and the agreement are every rank's same code): exit 138 (128 + 10) once the step is
    saved, and a stand-in ``scontrol`` records how it was called."""
    env = on_slurm(tmp_path / "r", tmp_path / "bin")
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("SLURM_JOB_ID", env["SLURM_JOB_ID"])
    loss, steps = engine_for_pretraining.reconstruction_loss, []

    def signalled_in_the_second_step(*args, **kwargs):
        loss_fn = loss(*args, **kwargs)

        def loss_then_signal(batch):
            steps.append(len(steps))
            if len(steps) == 2:
                os.kill(os.getpid(), signal.SIGUSR1)
            return loss_fn(batch)

        return loss_then_signal

    monkeypatch.setattr(engine_for_pretraining, "reconstruction_loss", signalled_in_the_second_step)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(run_mae_pretraining.main, run_mae_pretraining.get_args_parser().parse_args(
            [*PRETRAIN, "--num_workers", "0", "--requeue", "--output_dir", str(out)]))
    output = capsys.readouterr().out
    assert exit_info.value.code == 138 and "stopping on SIGUSR1 after epoch 0 step 2/8" in output, output[-3000:]
    assert (tmp_path / "bin" / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    assert "SLURM job 4242 requeued" in output
    assert torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)["step"] == 2


def test_max_image_pixels_lets_large_images_in(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    for index in range(8):
        size = (40, 40) if index == 0 else (64, 48)  # 1,600 pixels, then 3,072
        Image.new("RGB", size, (index * 30, 90, 200)).save(data / f"{index}.png")
    out = tmp_path / "out"
    argv = [*PRETRAIN, "--num_workers", "0", "--epochs", "1", "--data_path", str(data), "--output_dir", str(out)]
    with pytest.warns(UserWarning, match="skipping oversized image"):
        run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(argv + ["--max_image_pixels",
                                                                                          "3000"]))
    assert json.loads((out / "log.txt").read_text().splitlines()[-1])["skipped_images"] == 7  # all but the first
    run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(argv + ["--epochs", "2"]))
    assert json.loads((out / "log.txt").read_text().splitlines()[-1])["skipped_images"] == 0  # a new process


FINETUNE = [*TINY_VIT, "--num_samples", "8", "--batch_size", "4", "--epochs", "1"]
BAD_VALUES = [  # (stage, the flag and its values..., the message)
    ("pretraining", "--lr", "-1", "--lr must be positive, got -1.0"),
    ("pretraining", "--lr", "0", "--lr must be positive, got 0.0"),
    ("pretraining", "--blr", "nan", "--blr must be positive, got nan"),
    ("pretraining", "--blr", "inf", "--blr must be positive, got inf"),
    ("pretraining", "--min_lr=-1e-6", "--min_lr must be at least 0, got -1e-06"),
    ("pretraining", "--weight_decay", "-0.05", "--weight_decay must be at least 0, got -0.05"),
    ("pretraining", "--warmup_epochs", "-1", "--warmup_epochs must be at least 0, got -1.0"),
    ("pretraining", "--clip_grad", "0", "--clip_grad must be a positive norm, got 0.0"),
    ("pretraining", "--clip_grad", "nan", "--clip_grad must be a positive norm, got nan"),
    ("pretraining", "--drop_path", "1.5", "--drop_path must be in [0, 1), got 1.5"),
    ("pretraining", "--mask_ratio", "nan", "--mask_ratio must be in [0, 1), got nan"),
    ("pretraining", "--opt_betas", "0.9", "1.5", "--opt_betas must be in [0, 1), got 1.5"),
    ("pretraining", "--std", "0.2", "0", "0.2", "--std must be positive, got 0.0"),
    ("pretraining", "--num_workers", "-1", "--num_workers must be at least 0, got -1"),
    ("pretraining", "--max_image_pixels", "0", "--max_image_pixels must be at least 1, got 0"),
    ("pretraining", "--preempt_signals", "TERM", "KILL", "--preempt_signals: KILL is not a signal that can be caught"),
    ("pretraining", "--requeue", "--requeue requeues the SLURM job, but SLURM_JOB_ID is not set"),
    ("finetuning", "--layer_decay", "0", "--layer_decay must be in (0, 1], got 0.0"),
    ("finetuning", "--layer_decay", "1.5", "--layer_decay must be in (0, 1], got 1.5"),
    ("finetuning", "--smoothing", "-0.1", "--smoothing must be in [0, 1), got -0.1"),
    ("finetuning", "--reprob", "2", "--reprob must be in [0, 1], got 2.0"),
    ("finetuning", "--mixup", "-0.8", "--mixup must be at least 0, got -0.8"),
    ("finetuning", "--lr=-inf", "--lr must be positive, got -inf"),
]
SCRIPTS = {"pretraining": (run_mae_pretraining, PRETRAIN), "finetuning": (run_class_finetuning, FINETUNE)}


@pytest.mark.parametrize("case", BAD_VALUES, ids=lambda case: " ".join(case[1:-1]))
def test_a_bad_value_exits_2_with_its_message_and_an_empty_output_folder(case, tmp_path, capsys, monkeypatch):
    stage, *flag, message = case
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    script, argv = SCRIPTS[stage]
    out = tmp_path / "out"
    error = usage_error(script.main, script.get_args_parser(), [*argv, *flag, "--output_dir", str(out)], capsys)
    assert error.startswith(f"error: {message}") and error.count("\n") == 1, error
    assert not out.exists()


def test_knn_on_an_image_folder_without_eval_data_path_names_the_flag_and_imnet(tmp_path, capsys):
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "a.png")
    error = usage_error(run_knn_eval.main, run_knn_eval.get_args_parser(),
                        ["--data_set", "image_folder", "--data_path", str(tmp_path), "--output_dir",
                         str(tmp_path / "out")], capsys)
    assert "--eval_data_path" in error and "--data_set IMNET" in error and error.count("\n") == 1


def test_a_step_checkpoint_from_before_positions_were_counted_resumes_at_its_step():
    """Older step checkpoints hold ``step`` and rank 0's ``loss_sum`` only; they were written by
    ``step`` batches of ``batch_size`` on each of ``world_size`` ranks."""
    old = {"epoch": 3, "step": 5, "loss_sum": 2.5, "args": {"batch_size": 4, "world_size": 2}}
    start = epoch_start(old, 3)
    assert (start.samples_done, start.losses_counted, start.samples_per_epoch) == (5 * 4 * 2, 5 * 2, None)
    assert start.loss_sum_of(0, 2) == start.loss_sum_of(1, 2) == 2.5  # as every rank resumed before
    assert epoch_start(old, 4) == EpochStart()  # another epoch starts at its beginning
    written = {"epoch": 3, **EpochStart(samples_done=24, samples_per_epoch=32, loss_sums=(1.0, 2.0),
                                       losses_counted=6).to_checkpoint(step=3)}
    assert epoch_start(written, 3) == EpochStart(24, 32, (1.0, 2.0), 6)
    assert epoch_start(written, 3).loss_sum_of(0, 1) == 3.0  # one process now: all of it on rank 0
