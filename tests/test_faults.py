"""One rank's trouble is every rank's decision. Each fault is injected into one rank's process
(``tests/fault_rank.py``, no hooks in the product) on gloo, each rank started on its own with
torchrun's environment (no agent that would end the others), and the tests assert what every rank
printed and how it exited: on NCCL a rank that leaves alone would leave the others waiting in their
next collective, so every rank must stop at the same point with the cause, not a connection error.
And the troubles of one process: a folder in use, Ctrl-C, a full disk, memory that runs out."""
import contextlib
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
import torch.distributed.checkpoint as dcp
from PIL import Image
from torch.distributed.checkpoint.api import CheckpointException

import run_mae_pretraining
import utils
from helpers import (
    PRETRAIN,
    finish,
    on_slurm,
    run_ranks,
    single,
    start,
    wait_for_step,
)
from training import output_dir, sharded_checkpoint

NOT_A_CAUSE = ("Connection", "connection", "Traceback")  # what a rank says when another left it alone


def assert_every_rank(outputs, code: int, line: str) -> None:
    for rank, (exit_code, text) in enumerate(outputs):
        assert exit_code == code and line in text, f"rank {rank} exited {exit_code}:\n{text[-3000:]}"
        assert not any(word in text for word in NOT_A_CAUSE), f"rank {rank}:\n{text[-3000:]}"


def test_a_nan_loss_on_one_rank_stops_every_rank_before_any_checkpoint_holds_it(tmp_path):
    """Rank 1's loss at epoch 0 step 1 (its 2nd micro-step) is NaN; a step checkpoint follows every
    update, so without the agreement rank 0 would write one from the poisoned weights."""
    out = tmp_path / "out"
    outputs = run_ranks([*PRETRAIN, "--save_ckpt_steps", "1", "--output_dir", str(out)], tmp_path / "records",
                        "nan_loss", FAULT_STEP="1")
    assert_every_rank(outputs, 1, "error: loss is not finite on rank 1 at epoch 0 step 1")
    checkpoint = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (0, 1)  # the update before the bad one
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
    out = tmp_path / "out"
    outputs = run_ranks([*PRETRAIN, "--data_path", str(shard), "--output_dir", str(out)], tmp_path / "records",
                        "bad_shard")
    assert_every_rank(outputs, 2, f"error: on rank 1: shard {shard} is truncated")
    assert not out.exists()


@pytest.fixture
def trained(uninterrupted, tmp_path) -> Path:
    """A copy of the 2-process run's folder: ``checkpoint-last.pth`` at the end of epoch 1."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(uninterrupted / "out" / "checkpoint-last.pth", out)
    return out


def test_a_checkpoint_one_rank_sees_damaged_stops_every_rank(trained, tmp_path):
    outputs = run_ranks([*PRETRAIN, "--epochs", "4", "--output_dir", str(trained)], tmp_path / "records",
                        "corrupt_read")
    assert_every_rank(outputs, 2, f"error: on rank 1: checkpoint {trained / 'checkpoint-last.pth'} is truncated or "
                                  "corrupt")
    assert all("do the ranks see the same file?" in text and "epoch 3" not in text for _, text in outputs)


def test_a_memory_error_while_reading_a_checkpoint_is_no_damage_and_no_older_one_is_tried(trained, monkeypatch,
                                                                                          capsys):
    """Only a damaged file makes ``--auto_resume`` fall back to an older checkpoint; any other
    failure to read stops the run with its cause (one process here: the choice is rank 0's, and a
    failure on one rank stopping all is the damaged file's test above)."""
    shutil.copy(trained / "checkpoint-last.pth", trained / "checkpoint-1.pth")  # an older one it must not pick
    load = torch.load

    def out_of_memory(path, *args, **kwargs):
        if str(path).endswith(".pth"):
            raise MemoryError("cannot allocate 9.6 GB")
        return load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(run_mae_pretraining.main, run_mae_pretraining.get_args_parser().parse_args(
            [*PRETRAIN, "--num_workers", "0", "--epochs", "4", "--output_dir", str(trained)]))
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and captured.err.count("\n") == 1, captured.err  # no "trying the next older"
    assert captured.err.startswith(f"error: checkpoint {trained / 'checkpoint-last.pth'} could not be read "
                                   "(MemoryError: cannot allocate 9.6 GB)")
    assert "resumed" not in captured.out


def test_a_second_launch_on_a_folder_in_use_exits_2_naming_the_holder_and_ctrl_c_hands_it_on(tmp_path, capsys):
    """One writer per output folder; and Ctrl-C pressed again and again (SIGINT to every process of
    the run, loader workers too) while the run finishes its step and writes: one line, exit 130,
    nothing half-written, the folder free, no SLURM requeue (the user's stop is no preemption), and
    the relaunch goes on from the saved step."""
    out, seen = tmp_path / "out", []
    first = start(single(out, ["--epochs", "50", "--save_ckpt_steps", "1", "--requeue"]), tmp_path / "r1",
                  env=on_slurm(tmp_path / "r1", tmp_path / "bin"))
    wait_for_step(first.stdout, epoch=0, step=1, seen=seen)
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(run_mae_pretraining.main, run_mae_pretraining.get_args_parser().parse_args(
            [*PRETRAIN, "--num_workers", "0", "--output_dir", str(out)]))
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"is in use by another run (host {socket.gethostname()}, pid {first.pid}" in error
    for _ in range(30):  # through the step's end, the save and the exit
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGINT)
        time.sleep(0.01)
    output = finish(first, seen)
    assert first.returncode == 130 and not (out / output_dir.LOCK_NAME).exists(), output[-2000:]
    assert output.count("stopping on SIGINT (Ctrl-C) after epoch") == 1 and "Traceback" not in output, output[-2000:]
    assert "requeue" not in output and not (tmp_path / "bin" / "scontrol.txt").exists()
    assert not list(out.glob(".*.tmp"))
    log = out / "log.txt"
    done = len(log.read_text().splitlines()) if log.exists() else 0  # epochs finished before the signal
    run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(
        [*PRETRAIN, "--num_workers", "0", "--epochs", str(done + 1), "--output_dir", str(out)]))
    assert "resumed from" in capsys.readouterr().out
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert epochs == list(range(done + 1))  # one writer: each epoch's line once


def test_ctrl_c_outside_a_training_step_is_one_line_and_exit_130_with_nothing_written(tmp_path, monkeypatch,
                                                                                     capsys):
    """Before the loop (here while the data is read) no step can finish first: the run ends at once."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mae_pretraining, "build_pretraining_dataset", interrupted)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(run_mae_pretraining.main, run_mae_pretraining.get_args_parser().parse_args(
            [*PRETRAIN, "--num_workers", "0", "--output_dir", str(out)]))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == ("error: interrupted (Ctrl-C) outside a training step; nothing is half-written; "
                                       f"the same command resumes from the newest checkpoint in {out}, if there is "
                                       "one\n")
    assert not out.exists()


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
                                                                                              capsys):
    out = small_disk / "out"
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(run_mae_pretraining.main, run_mae_pretraining.get_args_parser().parse_args(
            [*PRETRAIN, "--num_workers", "0", "--output_dir", str(out)]))
    last = out / "checkpoint-last.pth"
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (f"error: could not write checkpoint {last}: No space left on device; the "
                                       "previous checkpoint-last.pth is intact\n")
    assert not list(out.glob(".*.tmp"))
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (0, 3)  # the first step checkpoint, whole


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_full_disk_under_a_sharded_save_names_the_os_cause_not_dcps_traceback(small_disk):
    """DCP wraps each rank's error in a CheckpointException whose text is a traceback; the line names
    the OS's words instead (here without a process group: DCP wraps the same way on one process)."""
    target = small_disk / ".checkpoint-last.tmp"
    with pytest.raises(CheckpointException) as raised:
        dcp.save({"weights": torch.zeros(40_000_000)}, checkpoint_id=target)  # 160 MB
    assert str(sharded_checkpoint.write_failure(target, raised.value)) == (
        f"could not write checkpoint {target}: No space left on device; the checkpoints written before it are intact")
