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
import hashlib
import os
import tarfile
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
from torch.utils.data import Dataset

from image_data.files import UNREADABLE, MemberBytes, UnreadableImageError
from image_data.shard_names import IMAGE_EXTENSIONS, shard_paths
from utils import UsageError

LABEL_EXTENSION = "cls"
INDEX_SUFFIX = ".idx.npz"
INDEX_VERSION = 1
INDEX_FOLDER = "shard_index"  # under --output_dir, for shards whose own folder cannot be written
NO_LABEL = -1
END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE  # the two zero blocks every complete tar ends with
MAX_OPEN_SHARDS = 32  # per process: files kept open, and indexes kept loaded


# ----------------------------------------------------------------------------- one shard's index


class ShardIndex(NamedTuple):
    """One shard's samples, in the shard's order."""

    offsets: np.ndarray  # (n,) int64: where each image's bytes start
    sizes: np.ndarray  # (n,) int64
    labels: np.ndarray  # (n,) int64, NO_LABEL where the sample has no KEY.cls
    names: np.ndarray  # (n,) bytes: each image member's name, for messages and its extension


def split_name(name: str) -> Tuple[str, str]:
    """WebDataset's key and extension: ``dir/n01440764_10026.JPEG`` -> (``dir/n01440764_10026``, ``jpeg``)."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower() if dot else ""


def read_label(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: str) -> int:
    text = tar.extractfile(member).read().decode("utf-8", errors="replace").strip()
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"shard {shard}: {member.name} holds {text[:40]!r}, not an integer class") from None


def build_index(shard: str) -> ShardIndex:
    """Read ``shard``'s tar headers (and its small ``.cls`` members); a usage error naming the
    shard when it is empty, no tar, truncated, or holds no image."""
    samples: List[Tuple[int, int, int, str]] = []
    key, image, label = None, None, NO_LABEL

    def close_sample() -> None:
        if image is not None:
            samples.append((image.offset_data, image.size, label, image.name))

    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in iter(tar.next, None):
                if not member.isfile():
                    continue
                member_key, extension = split_name(member.name)
                if member_key != key:
                    close_sample()
                    key, image, label = member_key, None, NO_LABEL
                if extension in IMAGE_EXTENSIONS and (
                    image is None or IMAGE_EXTENSIONS.index(extension) < IMAGE_EXTENSIONS.index(split_name(image.name)[1])
                ):
                    image = member
                elif extension == LABEL_EXTENSION:
                    label = read_label(tar, member, shard)
            close_sample()
            end = tar.offset  # where a next header would start
    except tarfile.ReadError as error:
        reason = "is empty" if os.path.getsize(shard) == 0 else f"is not a readable tar file ({error})"
        if "unexpected end of data" in str(error):
            reason = "is truncated: it ends inside a member or before the tar end-of-archive blocks"
        raise UsageError(f"shard {shard} {reason}; copy it again or leave it out") from None
    check_complete(shard, end)
    if not samples:
        raise UsageError(f"shard {shard} holds no image ({', '.join(IMAGE_EXTENSIONS)}); leave it out")
    offsets, sizes, labels, names = zip(*samples)
    return ShardIndex(np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64),
                      np.array(labels, dtype=np.int64), np.array([name.encode() for name in names]))


def check_complete(shard: str, end: int) -> None:
    """A complete tar ends with two zero blocks after its last member; a shard cut short (a copy
    that stopped) has a partial header there, or nothing."""
    with open(shard, "rb") as handle:
        handle.seek(end)
        tail = handle.read(END_OF_ARCHIVE)
    if len(tail) < END_OF_ARCHIVE or any(tail):
        raise UsageError(f"shard {shard} is truncated: it ends without the tar end-of-archive blocks after byte "
                         f"{end}; copy it again or leave it out")


def shard_stamp(shard: str) -> Tuple[int, int]:
    """(size, mtime in ns): a shard whose stamp changed is indexed again."""
    stat = os.stat(shard)
    return stat.st_size, stat.st_mtime_ns


class IndexSummary(NamedTuple):
    count: int
    max_label: int  # NO_LABEL when no sample has one
    unlabelled: int


def summarize(index: ShardIndex) -> IndexSummary:
    labelled = index.labels[index.labels != NO_LABEL]
    return IndexSummary(len(index.offsets), int(labelled.max()) if len(labelled) else NO_LABEL,
                        len(index.labels) - len(labelled))


def write_index(index: ShardIndex, shard: str, path: str) -> None:
    """Save ``index`` to ``path`` atomically, under a temporary name of its own, since several
    processes may index the same shard at once; ``OSError`` when the folder cannot be written."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    summary = summarize(index)
    meta = np.array([INDEX_VERSION, *shard_stamp(shard), *summary], dtype=np.int64)
    handle, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, meta=meta, **index._asdict())
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0o600 would hide a shared data set's index from its other users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_summary(path: str, shard: str) -> Optional[IndexSummary]:
    """The summary of a cached index of ``shard`` that is still current, else None (missing, from
    an older format, unreadable, or the shard changed)."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            meta = saved["meta"].tolist()
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if len(meta) != 6 or meta[0] != INDEX_VERSION or tuple(meta[1:3]) != shard_stamp(shard):
        return None
    return IndexSummary(*meta[3:])


def load_index(path: str) -> ShardIndex:
    with np.load(path, allow_pickle=False) as saved:
        return ShardIndex(*(saved[name] for name in ShardIndex._fields))


def fallback_index_path(shard: str, index_dir: str) -> str:
    """Where the index of a shard in a folder that cannot be written goes: under
    ``index_dir/shard_index``, named by the shard and a hash of its absolute path."""
    digest = hashlib.sha1(os.path.abspath(shard).encode()).hexdigest()[:16]
    return os.path.join(index_dir, INDEX_FOLDER, f"{Path(shard).name}.{digest}{INDEX_SUFFIX}")


# ----------------------------------------------------------------------------- the set of shards


class ShardCatalog(NamedTuple):
    """What every process keeps of a set of shards: per shard, never per sample."""

    paths: Tuple[str, ...]
    index_paths: Tuple[str, ...]
    counts: np.ndarray  # (S,) int64: samples per shard
    max_label: int  # NO_LABEL when no sample has a label
    unlabelled: int  # samples without KEY.cls

    def num_classes(self, spec: str) -> int:
        """max label + 1; a usage error when some sample has no label."""
        if self.unlabelled:
            raise UsageError(f"{self.unlabelled} samples of {spec} have no KEY.cls label; labelled shards "
                             "(make_shards.py on a folder of class folders) are needed here")
        return self.max_label + 1


def catalog_shards(spec: str, index_dir: Optional[str]) -> ShardCatalog:
    """Index every shard of ``spec`` that has no current index, caching each beside its shard or,
    where that folder cannot be written, under ``index_dir/shard_index``.

    Every shard is checked before an index goes under ``index_dir``, so a bad shard is a usage
    error that leaves that folder as it was (the read-only shards are then read twice on their
    first use). Indexes beside the shards are written as they are built: each is correct alone."""
    paths = shard_paths(spec)
    index_paths: List[Optional[str]] = []
    summaries: List[Optional[IndexSummary]] = []
    for shard in paths:
        found = current_index(shard, index_dir)
        if found is None:
            index = build_index(shard)
            beside = shard + INDEX_SUFFIX
            try:
                write_index(index, shard, beside)
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
        summary = read_summary(path, shard)
        if summary is not None:
            return path, summary
    return None


def index_away(shard: str, index_dir: Optional[str]) -> str:
    """Index ``shard`` under ``index_dir``; a usage error when there is none or it cannot be written."""
    if not index_dir:
        raise UsageError(f"the folder of shard {shard} cannot be written, so its index needs --output_dir")
    path = fallback_index_path(shard, index_dir)
    try:
        write_index(build_index(shard), shard, path)
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
            self.files[shard] = os.open(self.catalog.paths[shard], os.O_RDONLY)
            self.opened += 1
            if len(self.files) > MAX_OPEN_SHARDS:
                os.close(self.files.popitem(last=False)[1])
        self.files.move_to_end(shard)
        return self.files[shard]

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
