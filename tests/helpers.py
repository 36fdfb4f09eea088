"""What the tests share (tests import this module, never each other): the tiny runs' flags;
launching tiny pretraining runs, one process, two under torchrun, or ranks forked from a fork server
that imported the scripts once (``start_ranks``: torchrun's environment, no agent), and reading what they did
(every step's (epoch, index) keys and loss, ``recording``; exit codes); comparing checkpoints; a
malicious pickle; a tiny MAE; IDX files written byte by byte."""
import atexit
import contextlib
import gzip
import json
import multiprocessing
import os
import re
import runpy
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterable, Iterator, List, Tuple

import numpy as np
import pytest
import torch

import utils

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from local_s3 import free_port  # noqa: E402  (the benchmarks' S3 server takes free ports the same way)

RECORDER = REPO / "tests" / "pretrain_record_samples.py"
# what every in-process run of a test builds on: tiny models at 32 pixels (a 2 x 2 grid of 16-pixel
# patches), on the CPU, no loader workers; a test adds its images, batch and epochs
TINY_MAE = ["--model", "pretrain_mae_tiny_patch16_224", "--input_size", "32", "--num_workers", "0", "--device", "cpu"]
TINY_VIT = ["--model", "vit_tiny_patch16_224", "--input_size", "32", "--num_workers", "0", "--device", "cpu"]
# the launched runs: 32 images, 4 per process: 4 steps an epoch on 2 processes, 8 on one, two epochs,
# a step checkpoint after every third update; clipping to 0.5 clips every step's gradients (their
# norms are near 1), so the clipping is exercised too
PRETRAIN = [*TINY_MAE, "--num_samples", "32", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1",
            "--blr", "1e-3", "--num_workers", "1", "--print_freq", "1", "--save_ckpt_steps", "3", "--clip_grad", "0.5"]
PROGRESS = re.compile(r"^epoch (\d+) \[(\d+)/\d+\]")


def environment(record_dir: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
                RECORD_DIR=str(record_dir))


def torchrun(out: Path, extra: List[str] = (), nproc: int = 2, launcher: List[str] = ()) -> List[str]:
    """Two recorded pretraining processes; ``launcher`` options go to torchrun, ``extra`` to the run."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
            str(free_port()), *launcher, str(RECORDER), *PRETRAIN, *extra, "--output_dir", str(out)]


def single(out: Path, extra: List[str] = ()) -> List[str]:
    return [sys.executable, str(RECORDER), *PRETRAIN, *extra, "--output_dir", str(out)]


def run(command: List[str], record_dir: Path) -> str:
    record_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, env=environment(record_dir), cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


def on_slurm(record_dir: Path, bin_dir: Path, job: str = "4242") -> dict:
    """``environment`` inside SLURM job ``job``, with a stand-in ``scontrol`` that writes how it
    was called to ``bin_dir/scontrol.txt``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {bin_dir / 'scontrol.txt'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    return dict(environment(record_dir), PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID=job)


def start(command: List[str], record_dir: Path, env: dict = None) -> subprocess.Popen:
    """The command in a session of its own, as a terminal starts one: ``os.killpg`` then signals
    all its processes (loader workers included), as Ctrl-C does."""
    record_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, env=env or environment(record_dir), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_step(lines: Iterable[str], epoch: int, step: int, seen: List[str]) -> None:
    """Read a run's output (a process's ``stdout``, or ``follow``) until the progress line of
    ``epoch`` ``step`` (1-based)."""
    for line in lines:
        seen.append(line)
        match = PROGRESS.match(line)
        if match and (int(match[1]), int(match[2])) >= (epoch, step):
            return
    raise AssertionError("the run ended before the step:\n" + "".join(seen)[-3000:])


def finish(process: subprocess.Popen, seen: List[str]) -> str:
    seen.append(process.communicate(timeout=120)[0])
    return "".join(seen)


KEY = 10**6  # label = epoch * KEY + index: pretraining ignores labels, so they can carry the key


@contextlib.contextmanager
def recording(record_dir: Path, rank: int = 0) -> Iterator[None]:
    """While inside, pretraining appends the (epoch, index) of every sample each training step
    trains on, and the step's loss, to ``record_dir/samples_rank{rank}.jsonl``, one JSON line a
    step (``records``); in this process or in a launched one (``pretrain_record_samples.py``)."""
    import datasets
    import engine_for_pretraining

    original_item, original_loss = datasets.SeededSamples.__getitem__, engine_for_pretraining.reconstruction_loss
    record = record_dir / f"samples_rank{rank}.jsonl"
    record_dir.mkdir(parents=True, exist_ok=True)

    def keyed_item(self, key):
        index, epoch = key
        image, _ = original_item(self, key)
        return image, epoch * KEY + index

    def recording_loss(*args, **kwargs):
        loss_fn = original_loss(*args, **kwargs)

        def loss(batch):
            keys = [divmod(int(label), KEY) for label in batch[1]]  # (epoch, index) pairs
            value = loss_fn(batch)
            with open(record, "a") as handle:
                handle.write(json.dumps({"keys": keys, "loss": float(value.detach())}) + "\n")
            return value

        return loss

    datasets.SeededSamples.__getitem__, engine_for_pretraining.reconstruction_loss = keyed_item, recording_loss
    try:
        yield
    finally:
        datasets.SeededSamples.__getitem__, engine_for_pretraining.reconstruction_loss = original_item, original_loss


def records(record_dir: Path, rank: int) -> List[dict]:
    """One rank's steps in order: {"keys": [(epoch, index), ...], "loss": float}."""
    path = record_dir / f"samples_rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def trained_keys(record_dir: Path) -> List[Tuple[int, int]]:
    """The (epoch, index) of every sample every rank trained on."""
    return [tuple(key) for path in sorted(record_dir.glob("samples_rank*.jsonl"))
            for line in path.read_text().splitlines() for key in json.loads(line)["keys"]]


def launched_pids(launcher_pid: int) -> List[int]:
    """The launcher's children: torchrun starts each worker as a process of its own."""
    children = []
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    return children


def final_state(out: Path):
    checkpoint = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    return checkpoint["model"], checkpoint["optimizer"]["state"]


def assert_bitwise_equal(a, b) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_bitwise_equal(a[key], b[key])
        else:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


class WritesAFile:
    """Unpickling this would create ``path``: the classic malicious checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


FAULTER = REPO / "tests" / "fault_rank.py"


def rank_environment(record_dir: Path, rank: int, nproc: int, port: int) -> dict:
    """What torchrun exports to a worker, for a rank started on its own as ``srun`` starts one."""
    return dict(environment(record_dir), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


# what a rank's process imports before its script runs: a forked rank skips these imports (about 3 s)
RANK_PRELOAD = ["torch", "timm", "run_mae_pretraining", "run_class_finetuning", "helpers"]


def forked_ranks() -> multiprocessing.context.BaseContext:
    """A fork server: a fresh interpreter that imported ``RANK_PRELOAD`` and nothing else, started
    once a session (beside the tests that run meanwhile); each rank of ``run_ranks`` is a fork of
    it that then runs its script as ``__main__`` (``become_rank``), as a new process would after
    those imports."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(RANK_PRELOAD)
    return context


def become_rank(script: str, argv: List[str], env: dict, log: str) -> None:
    """In a forked rank: a session of its own, stdout and stderr to ``log`` line by line, the
    launcher's environment and threads and a new process's start method (fork, for its loader
    workers), then the script, and the exit hooks an interpreter runs at its end (the scripts':
    loader workers left by a crash); then multiprocessing ends the process with the script's exit code."""
    os.setsid()
    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    os.close(handle)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(REPO)
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    multiprocessing.set_start_method("fork", force=True)
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        atexit._run_exitfuncs()


def start_ranks(script_args: List[str], record_dir: Path, fault: str = "", rank: int = 1, nproc: int = 2,
                script: Path = FAULTER, **env: str) -> List[multiprocessing.Process]:
    """``nproc`` ranks of ``script`` (``fault_rank.py``: ``fault`` injected into rank ``rank``),
    forked (``forked_ranks``) with torchrun's environment and no launcher's agent, so nothing but
    the ranks themselves ends them; each one's output goes to ``record_dir/output_rank{R}.txt``."""
    record_dir.mkdir(parents=True, exist_ok=True)
    port, context, processes = free_port(), forked_ranks(), []
    for index in range(nproc):
        log = record_dir / f"output_rank{index}.txt"
        log.write_text("")  # there to be followed from the start
        environment_ = dict(rank_environment(record_dir, index, nproc, port), FAULT=fault, FAULT_RANK=str(rank), **env)
        processes.append(context.Process(target=become_rank, args=(str(script), list(script_args), environment_,
                                                                  str(log))))
        processes[-1].start()
    return processes


def follow(log: Path, process: multiprocessing.Process) -> Iterator[str]:
    """The lines of a forked rank's output as it writes them, until it has ended."""
    with open(log) as handle:
        pending = ""
        while True:
            pending += handle.readline()
            if pending.endswith("\n"):
                yield pending
                pending = ""
            elif not process.is_alive():
                rest = pending + handle.read()
                yield from rest.splitlines(keepends=True)
                return
            else:
                time.sleep(0.02)


def run_ranks(script_args: List[str], record_dir: Path, fault: str = "", rank: int = 1, nproc: int = 2,
              script: Path = FAULTER, timeout: float = 300, **env: str) -> List[Tuple[int, str]]:
    """``start_ranks``, and every rank's (exit code, stdout + stderr) once all have ended."""
    processes = start_ranks(script_args, record_dir, fault, rank, nproc, script, **env)
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(timeout=max(deadline - time.monotonic(), 1))
    for process in processes:  # a rank left waiting: killed, and its exit code (-9) and output fail the test
        if process.is_alive():
            process.kill()
            process.join()
    return [(process.exitcode, (record_dir / f"output_rank{index}.txt").read_text())
            for index, process in enumerate(processes)]


@contextlib.contextmanager
def exit_code_recorded() -> Iterator[None]:
    """For a launched script: write how this process ends (its exit code) to
    $RECORD_DIR/exit_rank{RANK}, which torchrun does not report when a signal stopped it."""
    record = Path(os.environ["RECORD_DIR"])
    record.mkdir(parents=True, exist_ok=True)
    path = record / f"exit_rank{os.environ.get('RANK', '0')}"
    try:
        yield
    except SystemExit as stop:
        path.write_text(str(stop.code if isinstance(stop.code, int) else 1))
        raise
    except BaseException:
        path.write_text("1")
        raise
    path.write_text("0")


def exit_codes(record_dir: Path, nproc: int = 2) -> List[int]:
    return [int((record_dir / f"exit_rank{rank}").read_text()) for rank in range(nproc)]


def tiny_mae(img_size: int = 64, **kwargs) -> torch.nn.Module:
    """192 wide, 2 encoder blocks (the tiny decoder already has 2), 16 patches at 64 px; seeded."""
    import timm

    import modeling_pretrain  # noqa: F401  (registers the pretrain_mae_* names with timm)

    torch.manual_seed(0)
    return timm.create_model("pretrain_mae_tiny_patch16_224", img_size=img_size, depth=2, **kwargs).eval()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """LeCun's layout: 0, 0, type 0x08 (unsigned byte), the number of dimensions, each size as a
    big-endian 32-bit integer, then the bytes."""
    data = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", size) for size in array.shape)
    data += array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def idx_folder(root: Path, gz: bool = True, train: int = 40, val: int = 20) -> Path:
    """Four IDX files of 28 x 28 noise with labels 0-9 in turn."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", val)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10, gz)
    return root


def usage_error(main, parser, argv, capsys) -> str:
    """What ``main`` printed on stderr when the command line ``argv`` ended it with exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(main, parser.parse_args(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def usage_error_of(module, argv, capsys) -> str:
    """``usage_error`` of a ``run_*`` script's ``main`` and parser."""
    return usage_error(module.main, module.get_args_parser(), argv, capsys)


MLFLOW_START_SECONDS = 60


class MlflowServer:
    """``mlflow server`` on a free loopback port with a SQLite store, stopped afterwards. Started
    when the session's tests are known (``tests/conftest.py``), so it boots while others run."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.uri = f"http://127.0.0.1:{free_port()}"
        self.log_path = folder / "server.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                 self.uri.rsplit(":", 1)[1], "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                 "--default-artifact-root", str(folder / "artifacts"), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + MLFLOW_START_SECONDS
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"the MLflow server did not answer within {MLFLOW_START_SECONDS} s: "
                    f"{self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

