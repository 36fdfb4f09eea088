"""One shard's index: where each sample's image starts in the tar, its size and its label, built
from the tar headers alone (and the small ``.cls`` members), saved as ``SHARD.tar.idx.npz`` with the
shard's stamp (size and modification time) so that a changed shard is indexed again.

Members are grouped by key as WebDataset groups them (``dir/KEY.jpg``, ``dir/KEY.cls``: the key is
the name up to the first dot of its last part); a sample's image is its member with an image
extension, its label the integer in ``KEY.cls``, and other members (``.json``, ``.txt``) are left
alone.
"""
import hashlib
import os
import tarfile
import tempfile
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from image_data.shard_cache import ShardCache
from image_data.shard_names import IMAGE_EXTENSIONS
from utils import UsageError

LABEL_EXTENSION = "cls"
INDEX_SUFFIX = ".idx.npz"
INDEX_VERSION = 1
INDEX_FOLDER = "shard_index"  # under --output_dir, for shards whose own folder cannot be written
NO_LABEL = -1
END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE  # the two zero blocks every complete tar ends with


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


def write_index(index: ShardIndex, stamp: Tuple[int, int], path: str) -> None:
    """Save ``index`` of the shard of ``stamp`` (``shard_stamp``, or an object's size and
    last-modified time) to ``path`` atomically, under a temporary name of its own, since several
    processes may index the same shard at once; ``OSError`` when the folder cannot be written."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    summary = summarize(index)
    meta = np.array([INDEX_VERSION, *stamp, *summary], dtype=np.int64)
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


def read_summary(path: str, stamp: Tuple[int, int], *, size_only: bool = False) -> Optional[IndexSummary]:
    """The summary of a cached index of the shard of ``stamp`` that is still current, else None
    (missing, from an older format, unreadable, or the shard changed). ``size_only`` for an index
    uploaded beside a remote shard, whose upload gave the shard another time."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            meta = saved["meta"].tolist()
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if len(meta) != 6 or meta[0] != INDEX_VERSION or tuple(meta[1:3 - size_only]) != tuple(stamp[:2 - size_only]):
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


class ShardCatalog(NamedTuple):
    """What every process keeps of a set of shards: per shard, never per sample."""

    paths: Tuple[str, ...]
    index_paths: Tuple[str, ...]
    counts: np.ndarray  # (S,) int64: samples per shard
    max_label: int  # NO_LABEL when no sample has a label
    unlabelled: int  # samples without KEY.cls
    sizes: Optional[np.ndarray] = None  # (S,) int64: bytes per shard, for shards in object storage
    cache: Optional[ShardCache] = None  # where shards in object storage are read from

    def num_classes(self, spec: str) -> int:
        """max label + 1; a usage error when some sample has no label."""
        if self.unlabelled:
            raise UsageError(f"{self.unlabelled} samples of {spec} have no KEY.cls label; labelled shards "
                             "(make_shards.py on a folder of class folders) are needed here")
        return self.max_label + 1
