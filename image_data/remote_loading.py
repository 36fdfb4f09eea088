"""What the training loader adds for shards in object storage: the window of shards the epoch is
reading and the next one fetched ahead (``shard_cache.Prefetcher``), and a shard that cannot be
fetched stopping every rank at the same step.

A worker that cannot fetch a shard after its retries raises ``FetchError``, which reaches one
rank's training process; the others would wait for it in the step's all-reduce (for ever under
NCCL, until the watchdog). So each step's batch is agreed first: one all-reduce of one integer
over gloo, and when any rank failed, every rank raises the same error before the step, with the
last checkpoint as it was.
"""
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from image_data.epoch_order import ShardWindowOrder
from image_data.files import wrapped
from image_data.remote import FetchError
from image_data.shard_cache import GB, Prefetcher, ShardCache
from image_data.shards import ShardImages
from utils import UsageError, get_world_size, raise_on_all_ranks


def remote_loading(dataset: Dataset, order: ShardWindowOrder, shuffle_window: int) -> Optional["RemoteLoading"]:
    """The prefetch and agreement of a training loader of shards in object storage (None for
    local data); a collective."""
    shards = wrapped(dataset, ShardImages)
    catalog = None if shards is None else shards.reader.catalog
    if catalog is None or catalog.cache is None:
        return None
    check_cache_limit(catalog.cache, catalog.sizes, shuffle_window)
    return RemoteLoading(Prefetcher(catalog.cache, catalog.paths, catalog.sizes, order))


class RemoteLoading:
    """The prefetch and the agreement of one training loader."""

    def __init__(self, prefetcher: Prefetcher) -> None:
        self.prefetcher = prefetcher
        self.group = None
        if get_world_size() > 1 and dist.get_backend() != dist.Backend.GLOO:  # a collective: every rank builds it
            self.group = dist.new_group(backend="gloo")

    def batches(self, start_loading: Callable[[], Iterator], *, epoch: int, start: int,
                global_batch: int) -> Iterator:
        """The loader's batches of ``epoch`` from position ``start``, each agreed by every rank."""
        self.prefetcher.reached(epoch, start)
        batches = start_loading()
        step = 0
        while True:
            self.prefetcher.reached(epoch, start + step * global_batch)
            error, batch = None, None
            try:
                batch = next(batches)
            except StopIteration:  # every rank has as many steps
                return
            except FetchError as found:
                error = FetchError(worker_message(found))
            self.agree(error)
            yield batch
            step += 1

    def agree(self, error: Optional[FetchError]) -> None:
        """A collective: raise on every rank when any rank's fetch failed."""
        if get_world_size() > 1:
            flag = torch.tensor([error is not None], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            if not flag:
                return
        raise_on_all_ranks(error)


def worker_message(error: FetchError) -> str:
    """The message a worker raised: the DataLoader passes it on inside a traceback's text."""
    last = str(error).rstrip().splitlines()[-1] if str(error).strip() else ""
    return last.split(f"{FetchError.__name__}: ", 1)[-1]


def check_cache_limit(cache: ShardCache, sizes: np.ndarray, window: int) -> None:
    """The limit must hold two windows of the largest shards: the one being read and the next."""
    need = int(np.sort(sizes)[::-1][: 2 * window].sum())  # bytes of the 2 * window largest shards
    if need > cache.limit:
        raise UsageError(f"--shard_cache_gb {cache.settings.limit_gb:g} holds less than two windows of shards "
                         f"(--shuffle_window {window}: {need / GB:.2f} GB); raise it or lower --shuffle_window")
