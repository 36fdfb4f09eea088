"""The run's output folder: writable from every rank, and held by one run at a time.

Rank 0 holds ``OUTPUT_DIR/.run.lock`` (host, pid, scheduler job id, start time), refreshed every
minute while the run lives and removed when it ends, however it ends short of a kill. A second
launch on the folder exits 2 at once, naming the holder. A lock is taken over, with one line, when
its holder's pid is gone on this host (or is this process's own: a restarted container), when it
carries this launch's scheduler job id (a requeued SLURM job, a torchrun restart), or when it has
not been refreshed for ``STALE_MINUTES`` (a holder killed on another host). Every rank hears rank
0's decision, so all go on or all stop.
"""
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from utils import UsageError, broadcast_from_main, check_writable_dir, is_main_process, raise_on_all_ranks

LOCK_NAME = ".run.lock"
REFRESH_SECONDS = 60.0
STALE_MINUTES = 10


def scheduler_job() -> str:
    """What a relaunch of the same job shares: SLURM's job id (kept by ``scontrol requeue``), or
    torchrun's rendezvous id when one was given; '' for a plain launch."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return "" if run_id in ("", "none") else f"torchrun:{run_id}"


def own_record() -> Dict[str, Any]:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": scheduler_job(), "started": now,
            "refreshed": now, "token": uuid.uuid4().hex}


def pid_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def takeover_reason(holder: Optional[Dict[str, Any]], mine: Dict[str, Any], now: float) -> str:
    """Why ``holder``'s lock may be taken over by ``mine``, or '' when it may not."""
    if holder is None:
        return "its lock file could not be read"
    if holder.get("host") == mine["host"] and not pid_is_alive(int(holder.get("pid", -1))):
        return f"pid {holder.get('pid')} is gone"
    if holder.get("host") == mine["host"] and int(holder.get("pid", -1)) == mine["pid"]:
        return f"pid {mine['pid']} is this process: a restarted container's, or a run this process ended"
    if mine["job"] and holder.get("job") == mine["job"]:
        return f"the same job ({mine['job']}) relaunched"
    if now - float(holder.get("refreshed", 0)) > STALE_MINUTES * 60:
        return f"not refreshed for over {STALE_MINUTES} minutes"
    return ""


def describe(holder: Dict[str, Any], now: float) -> str:
    job = f", job {holder['job']}" if holder.get("job") else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    seen = int(now - float(holder.get("refreshed", 0)))
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, started {started}, last seen {seen} s ago"


def read_lock(lock: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


def write_lock(lock: Path, record: Dict[str, Any]) -> None:
    """Replace the lock file at once, so a reader never sees half of it."""
    tmp = lock.with_name(f"{lock.name}.{record['token']}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, lock)


def take_lock(folder: Path) -> Dict[str, Any]:
    """Rank 0's claim on ``folder``: its record, or a ``UsageError`` naming the holder."""
    lock, mine = folder / LOCK_NAME, own_record()
    try:
        with open(lock, "x") as handle:
            handle.write(json.dumps(mine))
        return mine
    except FileExistsError:
        pass
    now = time.time()
    holder = read_lock(lock)
    reason = takeover_reason(holder, mine, now)
    if not reason:
        raise UsageError(f"--output_dir {folder} is in use by another run ({describe(holder, now)}): stop it, wait "
                         f"for it, or pass another --output_dir (a lock unrefreshed for {STALE_MINUTES} minutes "
                         "is taken over)")
    write_lock(lock, mine)
    time.sleep(0.05)  # another launch taking it over at the same moment: the last write wins, the other sees it
    if (read_lock(lock) or {}).get("token") != mine["token"]:
        raise UsageError(f"--output_dir {folder} was taken by another run at the same moment; pass another "
                         "--output_dir or relaunch once it has ended")
    print(f"took over the lock of {folder} from {describe(holder, now) if holder else 'an unreadable lock'} "
          f"({reason})", flush=True)
    return mine


class Refresher(threading.Thread):
    """Rewrites the lock's ``refreshed`` time every ``REFRESH_SECONDS`` while the lock is ours."""

    def __init__(self, lock: Path, record: Dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.lock, self.record, self.stopped = lock, record, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(REFRESH_SECONDS):
            if (read_lock(self.lock) or {}).get("token") != self.record["token"]:
                return  # taken over: no longer ours to refresh
            self.record["refreshed"] = time.time()
            try:
                write_lock(self.lock, self.record)
            except OSError:
                continue  # a full disk or a passing error: the next refresh tries again

    def release(self) -> None:
        self.stopped.set()
        self.join()
        if (read_lock(self.lock) or {}).get("token") == self.record["token"]:
            self.lock.unlink(missing_ok=True)


def probe_writable(folder: Path, flag: str) -> Optional[UsageError]:
    """This rank's ``utils.check_writable_dir``, its failure returned to share with the others."""
    try:
        check_writable_dir(str(folder), flag)
    except UsageError as error:
        return error
    return None


@contextmanager
def claim_output_dir(output_dir: Optional[str], *, lock: bool = True, flag: str = "--output_dir") -> Iterator[None]:
    """A collective: every rank checks that ``output_dir`` can be written and, with ``lock``, rank 0
    holds it for this run until the block ends; all ranks go on, or all raise the same error."""
    if not output_dir:
        yield
        return
    folder = Path(output_dir)
    raise_on_all_ranks(probe_writable(folder, flag))
    refresher, error = None, None
    if lock and is_main_process():
        try:
            refresher = Refresher(folder / LOCK_NAME, take_lock(folder))
            refresher.start()
        except UsageError as raised:
            error = raised
    message = broadcast_from_main(None if error is None else str(error)) if lock else None
    if message is not None:  # rank 0's decision, the same line on every rank
        raise UsageError(message) from error
    try:
        yield
    finally:
        if refresher is not None:
            refresher.release()
