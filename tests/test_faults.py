"""One rank's trouble is every rank's decision. Each fault is injected into one rank's process
(``tests/fault_rank.py``, no hooks in the product) on gloo, and the tests assert what every rank
printed and how it exited: on NCCL a rank that leaves alone would leave the others waiting in their
next collective, so every rank must stop at the same point with the cause, not a connection error."""
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import (
    PRETRAIN,
    REPO,
    environment,
    finish,
    rank_outputs,
    run,
    run_faulted,
    single,
    start,
    torchrun_logged,
    wait_for_step,
)
from training import output_dir

NOT_A_CAUSE = ("Connection", "connection", "Traceback")  # what a rank says when another left it alone


def assert_every_rank(outputs, code: int, line: str) -> None:
    for rank, (exit_code, text) in enumerate(outputs):
        assert exit_code == code and line in text, f"rank {rank} exited {exit_code}:\n{text[-3000:]}"
        assert not any(word in text for word in NOT_A_CAUSE), f"rank {rank}:\n{text[-3000:]}"


def test_a_nan_loss_on_one_rank_stops_every_rank_before_any_checkpoint_holds_it(tmp_path):
    """Rank 1's loss at epoch 1 step 1 (its 6th micro-step) is NaN; a step checkpoint follows every
    update, so without the agreement rank 0 would write one from the poisoned weights."""
    out, logs, records = tmp_path / "out", tmp_path / "logs", tmp_path / "records"
    run_faulted(torchrun_logged([*PRETRAIN, "--save_ckpt_steps", "1", "--output_dir", str(out)], logs), records,
                "nan_loss", FAULT_STEP="5")
    assert_every_rank(rank_outputs(logs, records), 1, "error: loss is not finite on rank 1 at epoch 1 step 1")
    checkpoint = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 1)  # the update before the bad one
    assert all(bool(torch.isfinite(tensor).all()) for tensor in checkpoint["model"].values())


def test_a_shard_one_rank_cannot_read_stops_every_rank_with_exit_2_before_anything_is_written(tmp_path):
    shard = tmp_path / "s0.tar"
    with tarfile.open(shard, "w") as tar:
        for index in range(32):
            buffer = io.BytesIO()
            Image.new("RGB", (36, 36), (index * 7, 40, 90)).save(buffer, format="JPEG")
            info = tarfile.TarInfo(f"{index:03d}.jpg")
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    out, logs, records = tmp_path / "out", tmp_path / "logs", tmp_path / "records"
    run_faulted(torchrun_logged([*PRETRAIN, "--data_path", str(shard), "--output_dir", str(out)], logs), records,
                "bad_shard")
    assert_every_rank(rank_outputs(logs, records), 2, f"error: on rank 1: shard {shard} is truncated")
    assert not out.exists()


@pytest.fixture
def trained(uninterrupted, tmp_path) -> Path:
    """A copy of the 2-process run's folder: ``checkpoint-last.pth`` at the end of epoch 2."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(uninterrupted / "out" / "checkpoint-last.pth", out)
    return out


def test_a_checkpoint_one_rank_sees_damaged_stops_every_rank(trained, tmp_path):
    logs, records = tmp_path / "logs", tmp_path / "records"
    run_faulted(torchrun_logged([*PRETRAIN, "--epochs", "4", "--output_dir", str(trained)], logs), records,
                "corrupt_read")
    outputs = rank_outputs(logs, records)
    assert_every_rank(outputs, 2, f"error: on rank 1: checkpoint {trained / 'checkpoint-last.pth'} is truncated or "
                                  "corrupt")
    assert all("do the ranks see the same file?" in text and "epoch 3" not in text for _, text in outputs)


def test_a_memory_error_while_reading_a_checkpoint_stops_every_rank_without_trying_an_older_one(trained, tmp_path):
    logs, records = tmp_path / "logs", tmp_path / "records"
    shutil.copy(trained / "checkpoint-last.pth", trained / "checkpoint-1.pth")  # an older one it must not pick
    run_faulted(torchrun_logged([*PRETRAIN, "--epochs", "4", "--output_dir", str(trained)], logs), records,
                "memory_error")
    outputs = rank_outputs(logs, records)
    assert_every_rank(outputs, 1, f"error: on rank 1: checkpoint {trained / 'checkpoint-last.pth'} could not "
                                  "be read (MemoryError: cannot allocate 9.6 GB)")
    assert all("older" not in text.split("error:")[0] and "resumed" not in text for _, text in outputs)


def test_fsdp_with_dist_eval_runs_as_many_passes_on_every_rank_and_counts_each_image_once(tmp_path):
    """17 evaluation images on 2 processes, 4 a batch: 3 batches on rank 0, 2 on rank 1, whose
    sharded model must still join rank 0's third all-gather."""
    out, logs, records = tmp_path / "out", tmp_path / "logs", tmp_path / "records"
    argv = ["--model", "vit_tiny_patch16_224", "--input_size", "32", "--num_samples", "17", "--batch_size", "4",
            "--epochs", "1", "--num_workers", "0", "--device", "cpu", "--fsdp", "--dist_eval", "--output_dir", str(out)]
    run_faulted(torchrun_logged(argv, logs), records, timeout=240, FAULT_SCRIPT="run_class_finetuning")
    assert_every_rank(rank_outputs(logs, records), 0, "")
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["test_num_samples"] == 17


def test_a_second_launch_on_a_folder_in_use_exits_2_naming_the_holder_and_a_preempted_one_hands_it_on(tmp_path):
    out, seen = tmp_path / "out", []
    first = start(single(out, ["--epochs", "50"]), tmp_path / "r1")
    wait_for_step(first, epoch=0, step=1, seen=seen)
    began = time.monotonic()
    second = subprocess.run(single(out), cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=environment(tmp_path / "r2"))
    assert second.returncode == 2 and time.monotonic() - began < 60, second.stderr[-2000:]
    assert f"is in use by another run (host {socket.gethostname()}, pid {first.pid}" in second.stderr
    first.send_signal(signal.SIGTERM)
    output = finish(first, seen)
    assert first.returncode == 143 and not (out / output_dir.LOCK_NAME).exists(), output[-2000:]
    done = len((out / "log.txt").read_text().splitlines())  # epochs finished before the signal
    assert "resumed from" in run(single(out, ["--epochs", str(done + 1)]), tmp_path / "r3")
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs == list(range(done + 1))  # one writer: each epoch's line once


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def holder(**fields) -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": "", "started": now - 60, "refreshed": now,
            "token": "theirs", **fields}


@pytest.mark.parametrize("fields, reason", [
    ({"pid": None}, "pid {pid} is gone"),
    ({"host": "elsewhere", "refreshed": time.time() - 11 * 60}, "not refreshed for over 10 minutes"),
    ({"host": "elsewhere", "job": "slurm:4242"}, "the same job (slurm:4242) relaunched"),
    ({"pid": os.getpid()}, "is this process: a restarted container's"),
])
def test_a_lock_is_taken_over_when_its_holder_is_gone_stale_or_this_job(fields, reason, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    pid = dead_pid()
    fields = {key: pid if value is None else value for key, value in fields.items()}
    (tmp_path / output_dir.LOCK_NAME).write_text(json.dumps(holder(**fields)))
    mine = output_dir.take_lock(tmp_path)
    assert json.loads((tmp_path / output_dir.LOCK_NAME).read_text())["token"] == mine["token"]
    assert reason.format(pid=pid) in capsys.readouterr().out


def test_a_live_lock_of_another_host_or_job_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / output_dir.LOCK_NAME).write_text(json.dumps(holder(host="elsewhere", pid=7, job="slurm:17")))
    with pytest.raises(output_dir.UsageError, match="in use by another run \\(host elsewhere, pid 7, job slurm:17"):
        output_dir.take_lock(tmp_path)


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 100 MB tmpfs: room for one checkpoint of the tiny model and its AdamW state (72 MB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_while_saving_is_one_line_naming_the_file_and_keeps_the_previous_checkpoint(small_disk,
                                                                                              tmp_path):
    out = small_disk / "out"
    (tmp_path / "r").mkdir()
    result = subprocess.run(single(out), cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=environment(tmp_path / "r"))
    last = out / "checkpoint-last.pth"
    assert result.returncode == 1, result.stderr[-2000:]
    assert (f"error: could not write checkpoint {last}: No space left on device; the previous checkpoint-last.pth "
            "is intact") in result.stderr and "Traceback" not in result.stderr
    assert not list(out.glob(".*.tmp"))
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (0, 3)  # the first step checkpoint, whole
