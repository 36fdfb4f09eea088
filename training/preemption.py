"""Stopping when the cluster or the user says so: schedulers send SIGTERM (or the signal of SLURM's
``--signal=USR1@120``) a while before they kill a job, and Ctrl-C sends SIGINT. Every rank then
finishes its optimizer step, the ranks agree at that step boundary, ``checkpoint-last.pth`` is
written with the position in the epoch, and the process exits with 128 + the signal's number (143
for SIGTERM, 138 for SIGUSR1, 130 for Ctrl-C), as a process killed by it would, so schedulers and
launchers treat it as preempted. Relaunching the same command continues where it stopped.
"""
import atexit
import functools
import multiprocessing
import multiprocessing.util  # its exit hook is registered on import: before kill_workers_at_exit's
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from training.settings import Settings
from utils import UsageError, get_world_size, is_main_process, process_group_timeout

SIGNAL_EXIT_BASE = 128  # a shell reports a process killed by signal N as 128 + N


def parse_signals(names: Sequence[str]) -> List[signal.Signals]:
    """``TERM``/``SIGTERM``-style names (``none`` for no handling) -> signals; a usage error otherwise."""
    if [name.lower() for name in names] == ["none"]:
        return []
    found = []
    for name in names:
        key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        if key not in signal.Signals.__members__ or key in ("SIGKILL", "SIGSTOP"):
            raise UsageError(f"--preempt_signals: {name} is not a signal that can be caught (e.g. TERM USR1, or none)")
        found.append(signal.Signals[key])
    return found


def stop_signals(names: Sequence[str]) -> List[signal.Signals]:
    """``--preempt_signals`` and Ctrl-C's SIGINT: a user's Ctrl-C ends the step and saves it too,
    rather than breaking into a checkpoint write."""
    found = parse_signals(names)
    return found if signal.SIGINT in found else [*found, signal.SIGINT]


def signal_name(signum: int) -> str:
    name = signal.Signals(signum).name
    return f"{name} (Ctrl-C)" if signum == signal.SIGINT else name


@dataclass(frozen=True)
class Stopping(Settings):
    """``--preempt_signals`` (Ctrl-C's SIGINT is always one), ``--requeue`` and the time a
    collective waits (the agreement's gloo group on NCCL runs)."""

    preempt_signals: Tuple[str, ...] = ("TERM", "USR1")
    requeue: bool = False
    dist_timeout: Optional[float] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_signals(self.preempt_signals)
        check_requeue(self.requeue)


class Preempted(Exception):
    """Raised by the training loop once the agreed step is saved: the run stops here."""

    def __init__(self, signum: int, epoch: int, step: int, steps: int, saved: Optional[Path]) -> None:
        self.signum, self.epoch, self.step, self.steps, self.saved = signum, epoch, step, steps, saved
        where = f"saved {saved}" if saved else "nothing saved (no --output_dir)"
        super().__init__(f"stopping on {signal_name(signum)} after epoch {epoch} step {step}/{steps}: "
                         f"{where}; relaunch the same command to continue")

    @property
    def exit_code(self) -> int:
        return SIGNAL_EXIT_BASE + self.signum


class PreemptionWatch:
    """Notes which of ``signals`` arrived; ``agreed()`` tells every rank, at the same step, whether
    any rank got one. The agreement is one all-reduce of one integer on the host, over gloo (a gloo
    group of its own when the training runs on NCCL), so it never waits for the GPU."""

    def __init__(self, signals: Sequence[signal.Signals], timeout_minutes: Optional[float] = None) -> None:
        self.signals = list(signals)
        self.received = 0
        self.previous: Dict[signal.Signals, object] = {}
        self.group = None
        if get_world_size() > 1 and dist.get_backend() != dist.Backend.GLOO:  # a collective: every rank builds it
            self.group = dist.new_group(backend="gloo", timeout=process_group_timeout(timeout_minutes))

    def install(self) -> None:
        for sig in self.signals:
            self.previous[sig] = signal.signal(sig, self.note)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def note(self, signum: int, frame: object) -> None:
        """The handler: only a note, acted on at the next step boundary; a second signal while the
        checkpoint is written changes nothing."""
        self.received = self.received or signum

    def agreed(self) -> int:
        """The signal some rank received (the largest number, if several), or 0: a collective."""
        if get_world_size() == 1:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)


def ignore_signals(signals: Sequence[int], worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: launchers signal the whole process group (torchrun's
    ``killpg``, SLURM), and a worker killed by it would end the run before its checkpoint (the
    loader turns a dead worker into an error in the training process)."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def kill_workers_left() -> None:
    """At interpreter exit, after a crash left a loader running, multiprocessing would terminate
    its workers with SIGTERM, which they ignore, and wait for them forever: kill them first. The
    loader's SIGCHLD handler would take those deaths for a worker's crash and print a second error
    after the run's own, so it is put back to the default first."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()


@functools.lru_cache(maxsize=None)
def kill_workers_at_exit() -> None:
    """Register ``kill_workers_left`` once, after multiprocessing's own exit hook, so it runs first."""
    atexit.register(kill_workers_left)


def worker_init_fn(preempt_signals: Sequence[str] = ("none",)) -> functools.partial:
    """``ignore_signals`` for the run's stop signals (Ctrl-C's at least, which a terminal sends to
    every process of the run; a script without a training loop stops in its main process)."""
    kill_workers_at_exit()
    signals = stop_signals(preempt_signals)
    return functools.partial(ignore_signals, [int(sig) for sig in signals])


def check_requeue(requeue: bool) -> None:
    """``--requeue`` needs a SLURM job to requeue."""
    if requeue and "SLURM_JOB_ID" not in os.environ:
        raise UsageError("--requeue requeues the SLURM job, but SLURM_JOB_ID is not set: run it under sbatch/srun "
                         "or leave --requeue out")


def requeue_slurm_job() -> None:
    """``scontrol requeue`` the job: SLURM starts it again, and the relaunched command resumes."""
    job = os.environ["SLURM_JOB_ID"]
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    outcome = "requeued" if result.returncode == 0 else f"could not requeue ({result.stderr.strip()})"
    print(f"SLURM job {job} {outcome}", flush=True)


@contextmanager
def preemptible(stopping: Stopping) -> Iterator[PreemptionWatch]:
    """Handle ``--preempt_signals`` and Ctrl-C while training; on ``Preempted``, print its line,
    requeue the SLURM job with ``--requeue`` (rank 0; not after Ctrl-C) and exit with 128 + the
    signal's number."""
    signals = stop_signals(stopping.preempt_signals)
    watch = PreemptionWatch(signals, stopping.dist_timeout)
    watch.install()
    try:
        yield watch
    except Preempted as stop:
        # from here on the signals are ignored, not handled: Python puts a handled signal back to
        # its default action while the interpreter shuts down, and a late one would then kill the
        # process after its checkpoint, with no exit code of its own
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        if is_main_process():
            print(stop, flush=True)
            if stopping.requeue and stop.signum != signal.SIGINT:  # a user's Ctrl-C is no preemption
                requeue_slurm_job()
        sys.exit(stop.exit_code)
    except BaseException:
        watch.restore()
        raise
    watch.restore()
