"""Runs that survive the cluster: preemption signals, elastic restarts, resuming on another number
of processes, and inputs that cannot stop a run. Tiny model, gloo on CPU."""
import json
import os
import re
import signal
import time
import zlib
from pathlib import Path
from typing import List

import pytest
import torch
from PIL import Image

import run_class_finetuning
import run_knn_eval
import run_mae_pretraining
import utils
from training.checkpoint import EpochStart, epoch_start
from helpers import (
    PRETRAIN,
    assert_bitwise_equal,
    environment,
    final_state,
    finish,
    run,
    single,
    start,
    torchrun,
    wait_for_step,
)

def test_sigterm_to_torchrun_mid_epoch_then_the_same_command_again_ends_bitwise_equal(uninterrupted, tmp_path):
    process = start(torchrun(tmp_path / "out"), tmp_path / "records")
    seen: List[str] = []
    wait_for_step(process, epoch=1, step=1, seen=seen)
    process.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers' process groups
    output = finish(process, seen)
    assert process.returncode != 0, output[-2000:]
    stop = re.search(r"stopping on SIGTERM after epoch (\d+) step (\d+)/4: saved (\S+)", output)
    assert stop, output[-3000:]
    checkpoint = torch.load(stop[3].rstrip(";"), weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (int(stop[1]), int(stop[2]))
    assert checkpoint["samples_done"] == checkpoint["step"] * 4 * 2
    output = run(torchrun(tmp_path / "out"), tmp_path / "records")
    assert f"resumed from {stop[3].rstrip(';')} at epoch {stop[1]} step {stop[2]}" in output
    for straight, resumed in zip(final_state(uninterrupted / "out"), final_state(tmp_path / "out")):
        assert_bitwise_equal(straight, resumed)


def worker_pids(launcher_pid: int) -> List[int]:
    """The launcher's children: torchrun starts each worker as a process of its own."""
    children = []
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    return children


def test_a_worker_killed_under_torchrun_max_restarts_resumes_from_the_step_checkpoint_bitwise(
        uninterrupted, tmp_path):
    process = start(torchrun(tmp_path / "out", launcher=["--max-restarts", "1"]), tmp_path / "records")
    seen: List[str] = []
    wait_for_step(process, epoch=1, step=3, seen=seen)  # the step checkpoint of update 3 is written
    os.kill(worker_pids(process.pid)[-1], signal.SIGKILL)
    output = finish(process, seen)
    assert process.returncode == 0, output[-3000:]
    assert "resumed from" in output and "at epoch 1 step" in output, output[-3000:]
    for straight, resumed in zip(final_state(uninterrupted / "out"), final_state(tmp_path / "out")):
        assert_bitwise_equal(straight, resumed)


def test_signals_during_the_save_change_nothing_and_usr1_exits_138(tmp_path):
    """A burst of SIGUSR1 while the run finishes its step and writes: one stop, a checkpoint that
    loads, and a relaunch that ends where an uninterrupted single-process run does."""
    straight, two_epochs = tmp_path / "straight", ["--epochs", "2"]
    run(single(straight, two_epochs), tmp_path / "r0")
    process = start(single(tmp_path / "out", two_epochs), tmp_path / "r1")
    seen: List[str] = []
    wait_for_step(process, epoch=0, step=5, seen=seen)
    for _ in range(20):
        process.send_signal(signal.SIGUSR1)
        time.sleep(0.01)
    output = finish(process, seen)
    assert process.returncode == 128 + signal.SIGUSR1 == 138, output[-3000:]
    assert output.count("stopping on SIGUSR1") == 1
    run(single(tmp_path / "out", two_epochs), tmp_path / "r2")
    for expected, resumed in zip(final_state(straight), final_state(tmp_path / "out")):
        assert_bitwise_equal(expected, resumed)


def test_requeue_asks_slurm_to_requeue_the_job_after_the_checkpoint(tmp_path):
    """A stand-in ``scontrol`` records how it was called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.txt'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = dict(environment(tmp_path / "r"), PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    process = start(single(tmp_path / "out", ["--requeue"]), tmp_path / "r", env=env)
    seen: List[str] = []
    wait_for_step(process, epoch=0, step=2, seen=seen)
    process.send_signal(signal.SIGTERM)
    output = finish(process, seen)
    assert process.returncode == 143, output[-3000:]
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    assert "SLURM job 4242 requeued" in output
    assert (tmp_path / "out" / "checkpoint-last.pth").is_file()


def bomb_png(path: Path, side: int = 14000) -> None:
    """A valid 1-bit PNG of side x side black pixels, over PIL's decompression-bomb limit, written
    without ever holding the image: a few kilobytes that decode to 196 million pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # width, height, 1 bit, greyscale
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + side // 8)  # filter byte, then the packed pixels
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


@pytest.mark.parametrize("decoder", ["pil", "tensor", "device"])
def test_a_decompression_bomb_is_skipped_named_and_counted(tmp_path, decoder):
    data = tmp_path / "images"
    data.mkdir()
    for index in range(7):
        Image.new("RGB", (48, 40), (index * 30, 90, 200)).save(data / f"good{index}.jpg", quality=90)
    bomb_png(data / "bomb.png")
    with Image.open(data / "bomb.png") as image:
        assert image.size == (14000, 14000)  # a real image, PIL would decode it were it allowed
    out = tmp_path / "out"
    argv = [*PRETRAIN, "--num_workers", "0", "--save_ckpt_steps", "0", "--num_samples", "8", "--epochs", "1",
            "--data_path", str(data), "--decoder", decoder, "--output_dir", str(out)]
    with pytest.warns(UserWarning, match=r"skipping oversized image .*bomb\.png: 14000 x 14000 pixels is over "
                                         r"--max_image_pixels 178956970"):
        run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(argv))
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["epoch"] == 0 and record["skipped_images"] == 1


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


def usage_error(main, parser, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(main, parser.parse_args(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_folder_with_no_readable_image_exits_2_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "images"
    data.mkdir()
    (data / "empty.jpg").write_bytes(b"")
    (data / "notes.png").write_text("not an image")
    bomb_png(data / "bomb.png")
    out = tmp_path / "out"
    error = usage_error(run_mae_pretraining.main, run_mae_pretraining.get_args_parser(),
                        [*PRETRAIN, "--data_path", str(data), "--batch_size", "1", "--output_dir", str(out)], capsys)
    assert error.startswith("error: none of the 3 images can be read; the last: ") and error.count("\n") == 1
    assert not out.exists()


FINETUNE = ["--model", "vit_tiny_patch16_224", "--input_size", "32", "--num_samples", "8", "--batch_size", "4",
            "--epochs", "1", "--num_workers", "0", "--device", "cpu"]
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
