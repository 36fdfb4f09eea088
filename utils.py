"""What every script shares and nothing else: errors and exit codes, safe file writes, the launch
and ranks of a distributed run, the timer and ``log.txt``. The training loop, checkpoints, the
precision switch and the command line are in ``training/``; of it this imports ``training.performance``.
"""
import argparse
import atexit
import datetime
import functools
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Mapping, NamedTuple, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from training.performance import reuse_freed_memory

# ----------------------------------------------------------------------------- errors and exit codes

USAGE_EXIT_CODE = 2  # bad input: the command line or the files it names
FAILURE_EXIT_CODE = 1  # the run itself failed (a non-finite loss, a checkpoint that cannot be written)
INTERRUPT_EXIT_CODE = 128 + signal.SIGINT  # 130, as a shell reports a process Ctrl-C ended


class UsageError(Exception):
    """Bad input from the command line or the files it names: one line, exit code 2."""


class RunFailure(RuntimeError):
    """The run failed for a reason it can name (a full disk, a checkpoint no rank can read): one
    line, exit code 1."""


class NonFiniteLossError(RunFailure):
    """The loss became NaN or infinite: the run stops before anything is saved, exit code 1."""


def exit_on_usage_error(main_fn: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> None:
    """Run ``main_fn(args)``; a ``UsageError`` becomes one clear line on stderr and exit 2, a
    ``RunFailure`` one line and exit 1, Ctrl-C outside a training step one line and exit 130 (in a
    step the loop finishes and saves it first: ``training.preemption``)."""
    exit_without_collecting()
    try:
        main_fn(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    except RunFailure as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(FAILURE_EXIT_CODE)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # every process of the run got the terminal's SIGINT
            print(f"error: {interrupted(getattr(args, 'output_dir', None), getattr(args, 'auto_resume', False))}",
                  file=sys.stderr)
        sys.exit(INTERRUPT_EXIT_CODE)


@functools.cache
def exit_without_collecting() -> None:
    """At exit, skip the interpreter's last garbage collection over the ~400k objects torch and timm
    leave: 1.5 s of every script's exit on a Zen 5, 0.3 s left. Every file is closed before then."""
    atexit.register(gc.freeze)


def interrupted(output_dir: Optional[str], auto_resume: bool) -> str:
    """What Ctrl-C outside a training step leaves: no file half-written (every write is atomic)."""
    line = "interrupted (Ctrl-C) outside a training step; nothing is half-written"
    if output_dir and auto_resume:
        line += f"; the same command resumes from the newest checkpoint in {output_dir}, if there is one"
    return line


# ----------------------------------------------------------------------------- files


def check_writable_dir(path: Optional[str], flag: str) -> None:
    """Create ``path`` or fail with a usage error before any work is done. The probe file is named
    for this host, process and moment, so ranks on nodes whose containers reuse pids never collide."""
    if not path:
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / f".write-test-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise UsageError(f"{flag} {path} cannot be written ({error.strerror}); choose another directory") from error


@contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; then fsync it and rename it over ``path``.

    A reader, a crash or a kill sees the old file or the new one, never half of one; a write that
    raises leaves no temporary behind. The temporary ends in ``.tmp``, so writers that pick the
    format from the suffix must be told it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- launch and ranks


def slurm_master_addr() -> str:
    """The first host of the SLURM allocation, which every task can reach."""
    nodes = os.environ["SLURM_JOB_NODELIST"]
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
    return hosts.stdout.split()[0]


class Launch(NamedTuple):
    """Where this process sits in the run: its rank, the number of processes, its GPU on the node."""

    rank: int
    world_size: int
    local_rank: int


def launch_env(local_rank: Optional[int] = None) -> Launch:
    """This process's place from the launcher's environment (nothing is set here but
    ``MASTER_ADDR``/``MASTER_PORT`` under a bare ``srun``).

    torchrun and ``torch.distributed.launch`` export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
    under ``srun`` SLURM's own variables say the same. Otherwise this is a single process;
    ``local_rank`` is ``--local_rank``, which the environment overrides.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", local_rank or 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("MASTER_ADDR", slurm_master_addr())
        env.setdefault("MASTER_PORT", "29500")
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return Launch(0, 1, 0)


def check_device(device: str) -> None:
    """Refuse ``--device cuda`` where no GPU is visible."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no GPU is visible; use --device cpu")


def process_group_timeout(minutes: Optional[float]) -> Optional[datetime.timedelta]:
    """``--dist_timeout``: how long a collective waits for a missing rank (None: torch's default)."""
    return None if minutes is None else datetime.timedelta(minutes=minutes)


def init_distributed(device: str, local_rank: Optional[int] = None, *, group_of_one: bool = False,
                     timeout_minutes: Optional[float] = None) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU) and return this process's device; a
    collective when there are several processes. ``group_of_one``: a group even for one process,
    which FSDP shards over. On NCCL, asynchronous error handling aborts the communicator and ends
    the process when a collective fails or times out, instead of leaving it blocked."""
    check_device(device)
    launch = launch_env(local_rank)
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    if device.type == "cpu":
        reuse_freed_memory()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = process_group_timeout(timeout_minutes)
    if launch.world_size > 1:
        dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size,
                                store=restart_store(launch), timeout=timeout)
        dist.barrier()
    elif group_of_one:
        dist.init_process_group(backend=backend, rank=0, world_size=1, store=dist.HashStore())
    return device


def restart_store(launch: Launch) -> Optional[dist.Store]:
    """Under torchrun, the process group's store with a prefix for each restart of the workers.

    torchrun keeps its store across ``--max-restarts`` restarts, so a restarted group would read
    the addresses the dead one left there and fail to connect (pytorch/pytorch#135712). Elsewhere
    None: ``init_process_group`` reads the environment itself.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank=launch.rank, world_size=launch.world_size))
    return dist.PrefixStore(f"mae_attempt_{attempt}", store)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


Result = TypeVar("Result")


@dataclass(frozen=True)
class ProcessGroup:
    """How a script joins its run's processes (``init_distributed``'s arguments): ``--device``,
    ``--local_rank``, ``--dist_timeout``, and whether one process forms a group too (``--fsdp``)."""

    device: str
    local_rank: Optional[int] = None
    group_of_one: bool = False
    timeout_minutes: Optional[float] = None


def run_distributed(run: Callable[[torch.device], Result], group: ProcessGroup) -> Result:
    """``run(device)`` inside the process group, torn down however it ends, so a failed rank does
    not leave the others waiting in a collective."""
    device = init_distributed(group.device, group.local_rank, group_of_one=group.group_of_one,
                              timeout_minutes=group.timeout_minutes)
    try:
        return run(device)
    finally:
        cleanup_distributed()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def rank_shard(num_samples: int) -> range:
    """This rank's samples of an evaluation: r, r + world, ...; no padding, so over all ranks
    every sample is seen exactly once however unevenly they divide."""
    return range(get_rank(), num_samples, get_world_size())


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity on one process)."""
    if get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def all_gather_floats(value: torch.Tensor) -> List[float]:
    """Every rank's value of a one-element tensor, in rank order (``[value]`` on one process)."""
    if get_world_size() == 1:
        return [float(value)]
    gathered = [torch.zeros_like(value) for _ in range(get_world_size())]
    dist.all_gather(gathered, value)
    return [float(item) for item in gathered]


def all_reduce_min(value: int, device: torch.device) -> int:
    """The smallest of every rank's integer (itself on one process)."""
    return all_reduce_int(value, device, dist.ReduceOp.MIN)


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest of every rank's integer (itself on one process)."""
    return all_reduce_int(value, device, dist.ReduceOp.MAX)


def all_reduce_int(value: int, device: torch.device, op: "dist.ReduceOp") -> int:
    """One integer reduced over ranks with ``op``, in a tensor on ``device`` (NCCL needs a GPU's)."""
    if get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=op)
    return int(tensor)


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` (plain Python: a path, a message) on every rank: a collective."""
    if get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(value: Any) -> List[Any]:
    """Every rank's plain Python ``value``, in rank order: a collective."""
    if get_world_size() == 1:
        return [value]
    gathered: List[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def raise_on_all_ranks(error: Optional[Exception]) -> None:
    """A collective: when any rank's ``error`` is set, every rank raises the same one, naming the
    ranks it came from, so all stop together with the cause (a rank left alone in a collective
    under NCCL would wait for the watchdog). A ``UsageError`` when every failing rank had bad input,
    else a ``RunFailure``."""
    if get_world_size() == 1:
        if error is not None:
            raise error
        return
    local = None if error is None else (isinstance(error, UsageError), str(error))
    failures = [(rank, found) for rank, found in enumerate(all_gather_objects(local)) if found is not None]
    if not failures:
        return
    messages = sorted({text for _, (_, text) in failures})
    ranks = ", ".join(str(rank) for rank, _ in failures)
    message = f"on rank{'s' if len(failures) > 1 else ''} {ranks}: {'; '.join(messages)}; every rank stops"
    if all(usage for _, (usage, _) in failures):
        raise UsageError(message) from error
    raise RunFailure(message) from error


def barrier() -> None:
    """Wait for every rank (nothing on one process)."""
    if get_world_size() > 1:
        dist.barrier()


def seed_everything(*key: int) -> None:
    """Seed torch (all devices), NumPy and ``random`` from a key of integers, mixed by NumPy's
    SeedSequence so neighbouring keys (ranks, steps) give unrelated streams."""
    words = np.random.SeedSequence([int(k) for k in key]).generate_state(4)  # (4,) uint32
    torch.manual_seed(int(words[0]) << 32 | int(words[1]))
    np.random.seed(words)
    random.seed(int(words[2]) << 32 | int(words[3]))


# ----------------------------------------------------------------------------- logs


class Timer:
    """Seconds since construction, for throughput and ETA."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def append_log(output_dir: Optional[str], record: Mapping[str, Any]) -> None:
    """One JSON line per epoch in ``output_dir/log.txt`` (main process only)."""
    if output_dir and is_main_process():
        with open(Path(output_dir) / "log.txt", "a") as handle:
            handle.write(json.dumps(dict(record)) + "\n")
