"""WebDataset tar shards read as a map-style dataset, so they keep the exact, elastic resume of
image folders: each shard gets an index (where each sample's image starts, its size, its label),
built once from the tar headers alone and cached, and a worker reads a sample with one positioned
read from a shard it keeps open. Nothing is extracted.

Members are grouped by key as WebDataset groups them (``dir/KEY.jpg``, ``dir/KEY.cls``: the key is
the name up to the first dot of its last part); a sample's image is its member with an image
extension, its label the integer in ``KEY.cls``, and other members (``.json``, ``.txt``) are left
alone. Hugging Face's ``-wds`` ImageNet shards read as they are.

What stays in memory is per shard (its path, its sample count), never per sample, but for the
indexes of the few shards a worker is reading (``ShardReader``).
"""
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np
from torch.utils.data import Dataset

from image_data.files import UNREADABLE, MemberBytes, UnreadableImageError
from image_data.remote import is_remote
from image_data.remote_shards import remote_catalog
from image_data.shard_cache import CacheSettings, cache_settings
from image_data.shard_index import (INDEX_SUFFIX, IndexSummary, ShardCatalog, ShardIndex, build_index,
                                    fallback_index_path, load_index, read_summary, shard_stamp, summarize,
                                    write_index)
from image_data.shard_names import shard_paths
from utils import UsageError

MAX_OPEN_SHARDS = 32  # per process: files kept open, and indexes kept loaded


# ----------------------------------------------------------------------------- the set of shards


def catalog_shards(spec: str, index_dir: Optional[str], cache: Optional[CacheSettings] = None) -> ShardCatalog:
    """Index every shard of ``spec`` that has no current index, caching each beside its shard or,
    where that folder cannot be written, under ``index_dir/shard_index``; shards in object
    storage are read through ``cache`` (default: ``index_dir/shard_cache``, ``image_data.remote_shards``).

    Every shard is checked before an index goes under ``index_dir``, so a bad shard is a usage
    error that leaves that folder as it was (the read-only shards are then read twice on their
    first use). Indexes beside the shards are written as they are built: each is correct alone."""
    paths = shard_paths(spec)
    if any(is_remote(path) for path in paths):
        if not all(is_remote(path) for path in paths):
            raise UsageError(f"{spec} names local shards and shards in object storage; keep them apart")
        return remote_catalog(spec, paths, cache or cache_settings(shard_cache=None, output_dir=index_dir))
    index_paths: List[Optional[str]] = []
    summaries: List[Optional[IndexSummary]] = []
    for shard in paths:
        found = current_index(shard, index_dir)
        if found is None:
            index = build_index(shard)
            beside = shard + INDEX_SUFFIX
            try:
                write_index(index, shard_stamp(shard), beside)
                found = (beside, summarize(index))
            except OSError:
                found = (None, summarize(index))
        index_paths.append(found[0])
        summaries.append(found[1])
    for position, shard in enumerate(paths):
        if index_paths[position] is None:
            index_paths[position] = index_away(shard, index_dir)
    labelled = [summary.max_label for summary in summaries]
    return ShardCatalog(tuple(paths), tuple(index_paths), np.array([summary.count for summary in summaries],
                                                                    dtype=np.int64),
                        max(labelled), sum(summary.unlabelled for summary in summaries))


def current_index(shard: str, index_dir: Optional[str]) -> Optional[Tuple[str, IndexSummary]]:
    """A cached index of ``shard`` that is still current, beside it or under ``index_dir``."""
    candidates = [shard + INDEX_SUFFIX] + ([fallback_index_path(shard, index_dir)] if index_dir else [])
    for path in candidates:
        summary = read_summary(path, shard_stamp(shard))
        if summary is not None:
            return path, summary
    return None


def index_away(shard: str, index_dir: Optional[str]) -> str:
    """Index ``shard`` under ``index_dir``; a usage error when there is none or it cannot be written."""
    if not index_dir:
        raise UsageError(f"the folder of shard {shard} cannot be written, so its index needs --output_dir")
    path = fallback_index_path(shard, index_dir)
    try:
        write_index(build_index(shard), shard_stamp(shard), path)
    except OSError as error:
        raise UsageError(f"cannot write the index of shard {shard} beside it nor under {index_dir}: {error}") from error
    return path


# ----------------------------------------------------------------------------- reading samples


class ShardReader:
    """A process's open shards and loaded indexes, at most ``MAX_OPEN_SHARDS`` of each, the least
    recently used closed first. A data-loader worker gets a fresh one (by pid), so no descriptor
    is shared across a fork."""

    def __init__(self, catalog: ShardCatalog) -> None:
        self.catalog = catalog
        self.pid: Optional[int] = None
        self.files: "OrderedDict[int, int]" = OrderedDict()
        self.indexes: "OrderedDict[int, ShardIndex]" = OrderedDict()
        self.opened = 0  # files opened by this process: what benchmarks/bench_data.py reports

    def __getstate__(self) -> Dict[str, object]:
        return {"catalog": self.catalog}

    def __setstate__(self, state: Dict[str, object]) -> None:
        self.__init__(state["catalog"])

    def own(self) -> None:
        if self.pid != os.getpid():  # a forked copy: the parent's descriptors are not ours to use
            self.files.clear()
            self.indexes.clear()
            self.pid = os.getpid()

    def index(self, shard: int) -> ShardIndex:
        self.own()
        if shard not in self.indexes:
            index = load_index(self.catalog.index_paths[shard])
            if len(index.offsets) != self.catalog.counts[shard]:
                raise OSError(f"shard {self.catalog.paths[shard]} changed since the run started; its samples are "
                              "skipped until the run starts again and indexes it again")
            self.indexes[shard] = index
            if len(self.indexes) > MAX_OPEN_SHARDS:
                self.indexes.popitem(last=False)
        self.indexes.move_to_end(shard)
        return self.indexes[shard]

    def descriptor(self, shard: int) -> int:
        self.own()
        if shard not in self.files:
            self.files[shard] = self.open(shard)
            self.opened += 1
            if len(self.files) > MAX_OPEN_SHARDS:
                os.close(self.files.popitem(last=False)[1])
        self.files.move_to_end(shard)
        return self.files[shard]

    def open(self, shard: int) -> int:
        """A descriptor of the shard: the file, or its copy in the cache (fetched when missing)."""
        cache = self.catalog.cache
        if cache is None:
            return os.open(self.catalog.paths[shard], os.O_RDONLY)
        return cache.open(self.catalog.paths[shard], int(self.catalog.sizes[shard]))

    def member(self, shard: int, position: int) -> Tuple[MemberBytes, int]:
        """The ``position``-th sample of ``shard``: its image's bytes (one positioned read) and label."""
        index = self.index(shard)
        name = f"{self.catalog.paths[shard]}:{index.names[position].decode()}"
        size = int(index.sizes[position])
        data = os.pread(self.descriptor(shard), size, int(index.offsets[position]))
        if len(data) != size:
            raise OSError(f"{name}: read {len(data)} of its {size} bytes; the shard is shorter than its index")
        return MemberBytes(name, data), int(index.labels[position])


class ShardImages(Dataset):
    """``(image, label)`` of every sample of the shards, in shard order (label ``NO_LABEL`` where a
    sample has none); ``loader`` decodes a ``MemberBytes``, ``limit`` keeps the first N samples."""

    def __init__(self, catalog: ShardCatalog, transform, loader, limit: Optional[int] = None) -> None:
        counts = catalog.counts
        if limit is not None:
            counts = np.clip(limit - np.concatenate([[0], np.cumsum(counts)[:-1]]), 0, counts)  # (S,)
        self.shard_counts = counts  # what image_data.epoch_order windows over
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # (S + 1,): each shard's first sample
        self.reader = ShardReader(catalog)
        self.transform, self.loader = transform, loader
        if catalog.cache is not None:  # shards in object storage: this process fetches for its loader's workers
            catalog.cache.serve()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> Tuple[object, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        position = index - int(self.starts[shard])
        try:
            source, label = self.reader.member(shard, position)
        except UNREADABLE as error:  # the shard or its index gone or changed since the start: a skip, not a stop
            raise UnreadableImageError(f"{self.reader.catalog.paths[shard]} sample {position}", error) from error
        image = self.loader(source)
        if self.transform is not None:
            image = self.transform(image)
        return image, label
