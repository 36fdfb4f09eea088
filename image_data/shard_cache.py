"""A bounded local cache of shards from object storage: whole shards downloaded (one GET each,
not one per sample: S3 bills per request and answers a small GET in tens of milliseconds), each
under a temporary name and then renamed, the least recently used evicted past the limit. The
loader's workers then read a cached shard exactly as a local one.

Every worker and rank of a host shares one cache: a shard is fetched under a lock of its own
(``flock``, released by the kernel when its holder dies), so no shard is downloaded twice at once
and none is seen half-written. A shard evicted while a worker reads it stays readable through the
worker's open descriptor.

Only the process that made the cache (a rank's training process) downloads, in threads of its own
(``Fetcher``): the object store's client runs on a tokio runtime, which a forked process cannot use
(its threads are gone; obstore's own maintainers say it is not fork safe), so a loader worker asks
its training process through a pipe and waits for the file, or for the one-line reason it failed.
The ``Prefetcher`` asks for the window of shards the epoch is in and the next one
(``image_data.epoch_order``), so the workers find them on disk.
"""
import fcntl
import hashlib
import multiprocessing
import os
import queue
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, NamedTuple, Optional, Sequence, Set, Tuple

import numpy as np

from image_data.remote import FetchError, Retrying, download, shown

GB = 1 << 30
CACHE_FOLDER = "shard_cache"  # under --output_dir, without --shard_cache
DEFAULT_CACHE_GB = 200.0  # --shard_cache_gb: two windows of 16 ImageNet-sized shards (1 GB each) and room to spare
PARTIAL = ".partial"
FAILED = ".failed"
FETCH_THREADS = 4  # downloads at once: one S3 stream gives about 100 MB/s, a node's link much more
WAIT_SECONDS = 0.02  # how often a worker looks for the shard it waits for
ASK_AGAIN_SECONDS = 1  # a worker asks again after this long: the shard may have been evicted before it looked


class CacheSettings(NamedTuple):
    """``--shard_cache`` (a folder), ``--shard_cache_gb`` and the retries of a download."""

    folder: str
    limit_gb: float
    retrying: Retrying = Retrying()


def cache_settings(*, shard_cache: Optional[str], output_dir: Optional[str], shard_cache_gb: float = DEFAULT_CACHE_GB,
                   shard_retries: int = Retrying().retries) -> Optional[CacheSettings]:
    """The cache the flags name: ``--shard_cache``, else ``output_dir/shard_cache``; None without either."""
    folder = shard_cache or (os.path.join(output_dir, CACHE_FOLDER) if output_dir else None)
    return None if folder is None else CacheSettings(folder, shard_cache_gb, Retrying(retries=shard_retries))


def cache_name(url: str) -> str:
    """A cached file's name: the URL's last part after a digest of the whole URL, so shards of
    the same name in two buckets never meet."""
    digest = hashlib.sha1(url.encode()).hexdigest()[:16]
    return f"{digest}-{url.rstrip('/').rpartition('/')[2].partition('?')[0]}"


class ShardCache:
    """The cache folder: ``shards/`` (evicted least recently used first), ``index/`` (kept) and
    ``locks/``. A forked copy (a loader worker) asks the process that made it for shards; a
    pickled one (a spawned process) fetches them itself."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self.root = Path(settings.folder)
        self.limit = int(settings.limit_gb * GB)
        self.owner = os.getpid()
        self.requests = multiprocessing.get_context("fork").SimpleQueue()  # from forked workers
        self.fetcher: Optional[Fetcher] = None

    def __getstate__(self) -> Dict[str, object]:
        return {"settings": self.settings}

    def __setstate__(self, state: Dict[str, object]) -> None:
        self.__init__(state["settings"])

    def forked(self) -> bool:
        return os.getpid() != self.owner

    def serve(self) -> "Fetcher":
        """This process's download threads, started once: they also answer its forked workers."""
        if self.fetcher is None:
            self.fetcher = Fetcher(self)
        return self.fetcher

    def request(self, url: str, size: int) -> None:
        """Have the shard fetched in the background (from a worker: by its training process)."""
        if self.forked():
            self.requests.put((url, size))
        else:
            self.serve().put(url, size)

    def make_folders(self) -> None:
        for part in ("shards", "index", "locks"):
            (self.root / part).mkdir(parents=True, exist_ok=True)

    def shard_path(self, url: str) -> Path:
        return self.root / "shards" / cache_name(url)

    def index_path(self, url: str) -> Path:
        return self.root / "index" / cache_name(url)

    @contextmanager
    def locked(self, url: str) -> Iterator[None]:
        with open(self.root / "locks" / f"{cache_name(url)}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def fetch(self, url: str, size: int, path: Path) -> None:
        """``url`` to ``path`` unless it is there with ``size`` bytes, under the URL's lock."""
        if has_size(path, size):
            return
        with self.locked(url):
            if has_size(path, size):
                return
            self.make_room(size)
            partial = path.with_name(path.name + PARTIAL)
            try:
                fetched = download(url, str(partial), self.settings.retrying)
                if fetched != size:
                    raise FetchError(f"{shown(url)} changed since the run started ({fetched} bytes, {size} "
                                     "then); relaunch to index it again")
                os.replace(partial, path)
            except OSError as error:
                raise FetchError(f"cannot write {shown(url)} into the shard cache {self.root}: "
                                 f"{error.strerror or error}; free space there or lower --shard_cache_gb") from None
            finally:
                if partial.exists():
                    partial.unlink()

    def shard(self, url: str, size: int) -> str:
        """The cached copy of the shard at ``url``, fetched if missing, marked as just used."""
        path = self.shard_path(url)
        for _ in range(3):
            self.fetch(url, size, path)
            try:
                os.utime(path)
                return str(path)
            except FileNotFoundError:  # evicted by another process between its fetch and now
                continue
        raise FetchError(f"{shown(url)} is evicted from the shard cache {self.root} as soon as it arrives; "
                         "raise --shard_cache_gb")

    def open(self, url: str, size: int) -> int:
        """A read-only descriptor of the cached shard, fetched when missing (fetched again if it
        was evicted between its check and its opening); it stays readable when evicted later."""
        for _ in range(3):
            try:
                return os.open(self.arrived(url, size) if self.forked() else self.shard(url, size), os.O_RDONLY)
            except FileNotFoundError:
                continue
        raise FetchError(f"{shown(url)} is evicted from the shard cache {self.root} as soon as it arrives; "
                         "raise --shard_cache_gb")

    def arrived(self, url: str, size: int) -> str:
        """In a forked worker: ask for the shard and wait until it is on disk; ``FetchError`` with
        the training process's reason when its fetch failed after this request."""
        path, failed = self.shard_path(url), self.failure_path(url)
        asked = time.time_ns()
        self.requests.put((url, size))
        while not has_size(path, size):
            try:  # a failure since the request (file times are coarser than the clock: a second's slack)
                if failed.stat().st_mtime_ns >= asked - 1e9:
                    raise FetchError(failed.read_text())
            except FileNotFoundError:
                pass
            if os.getppid() == 1:
                raise FetchError(f"{shown(url)}: the training process that fetches it is gone")
            time.sleep(WAIT_SECONDS)
            if time.time_ns() - asked > ASK_AGAIN_SECONDS * 1e9:  # evicted as it arrived: ask again
                asked = time.time_ns()
                self.requests.put((url, size))
        return str(path)

    def failure_path(self, url: str) -> Path:
        return self.root / "shards" / f"{cache_name(url)}{FAILED}"

    def keep(self, url: str, size: int, downloaded: Path) -> None:
        """Take the shard ``downloaded`` elsewhere in the cache folder (to be indexed) as its copy."""
        with self.locked(url):
            path = self.shard_path(url)
            if not has_size(path, size):
                self.make_room(size)
                os.replace(downloaded, path)

    def make_room(self, size: int) -> None:
        """Evict the least recently used shards until ``size`` more bytes fit the limit."""
        entries = []
        for entry in os.scandir(self.root / "shards"):
            if not entry.name.endswith((PARTIAL, FAILED)):
                try:
                    stat = entry.stat()
                except FileNotFoundError:  # evicted by another process meanwhile
                    continue
                entries.append((stat.st_mtime_ns, stat.st_size, entry.path))
        total = sum(entry[1] for entry in entries)
        for _, bytes_, path in sorted(entries):
            if total + size <= self.limit:
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            total -= bytes_


def has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


class Fetcher:
    """The training process's download threads: shards asked for by ``request`` (the prefetch)
    or by its loader workers (through the cache's pipe), each fetched once at a time; a failure
    is left as ``NAME.failed`` with its one line, for the worker waiting on it."""

    def __init__(self, cache: ShardCache) -> None:
        self.cache = cache
        self.queue: "queue.Queue[Tuple[str, int]]" = queue.Queue()
        self.busy: Set[str] = set()
        self.lock = threading.Lock()
        threads = [threading.Thread(target=self.work, daemon=True) for _ in range(FETCH_THREADS)]
        threads.append(threading.Thread(target=self.relay, daemon=True))
        for thread in threads:
            thread.start()

    def put(self, url: str, size: int) -> None:
        with self.lock:
            if url in self.busy:
                return
            self.busy.add(url)
        self.queue.put((url, size))

    def relay(self) -> None:
        while True:
            self.put(*self.cache.requests.get())

    def work(self) -> None:
        while True:
            url, size = self.queue.get()
            failed = self.cache.failure_path(url)
            try:
                self.cache.shard(url, size)
                failed.unlink(missing_ok=True)
            except Exception as error:  # any: a thread that died would leave its workers waiting
                write_failure(failed, str(error) if isinstance(error, FetchError) else f"cannot fetch {shown(url)} "
                              f"into the shard cache {self.cache.root}: {error}")
            finally:
                with self.lock:
                    self.busy.discard(url)


def write_failure(path: Path, message: str) -> None:
    """``NAME.failed`` with the reason; where even that cannot be written (a disk without a byte
    left), the waiting worker asks again each second, and each try fails the same way."""
    partial = path.with_name(path.name + PARTIAL)
    try:
        partial.write_text(message)
        os.replace(partial, path)
    except OSError:
        pass


class Prefetcher:
    """Asks for the shards of the window of the epoch's order that ``reached`` names and of the
    next one, each window once, so they are fetched while the one before trains."""

    def __init__(self, cache: ShardCache, urls: Sequence[str], sizes: np.ndarray, order) -> None:
        self.cache, self.urls, self.sizes = cache, list(urls), sizes
        self.order = order  # image_data.epoch_order.ShardWindowOrder: which shards each window reads
        self.requested: Set[Tuple[int, int]] = set()

    def reached(self, epoch: int, position: int) -> None:
        """The epoch's order is at ``position``: have its window and the next one fetched."""
        window = self.order.window_at(epoch, position)
        for key in (window, self.order.next_window(*window)):
            if key not in self.requested:
                self.requested.add(key)
                for shard in self.order.window_shards(*key):
                    if self.order.counts[shard]:  # a shard past --num_samples is never read
                        self.cache.request(self.urls[shard], int(self.sizes[shard]))
