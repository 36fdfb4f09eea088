"""The catalog of tar shards in object storage: every URL checked before anything is written (a
missing bucket or object, or refused credentials, is a usage error), then each shard's index
taken from the cache, else from a ``SHARD.tar.idx.npz`` beside the remote shard, else built from
the shard downloaded into the cache. The indexes are kept in the cache (never evicted), stamped
with the object's size and last-modified time, so a changed object is indexed again.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import numpy as np

from image_data.remote import FetchError, ObjectInfo, Retrying, download, info, listed, shown
from image_data.shard_cache import CacheSettings, ShardCache
from image_data.shard_index import (INDEX_SUFFIX, IndexSummary, ShardCatalog, build_index, load_index, read_summary,
                                    summarize, write_index)
from utils import UsageError

REQUESTS_AT_ONCE = 16  # HEADs and index GETs in flight while a catalog is made
T = TypeVar("T")


def each(function: Callable[..., T], *arguments: Sequence) -> List[T]:
    """``function`` over the zipped ``arguments``, a few requests at a time, in order."""
    with ThreadPoolExecutor(REQUESTS_AT_ONCE) as pool:
        return list(pool.map(function, *arguments))


def remote_catalog(spec: str, urls: Sequence[str], settings: Optional[CacheSettings]) -> ShardCatalog:
    """The catalog of the shards at ``urls`` (named by ``spec``), read through the cache."""
    if settings is None:
        raise UsageError(f"{spec}: shards in object storage are read through a local cache, which needs "
                         "--shard_cache or --output_dir")
    infos = shard_infos(urls)
    cache = ShardCache(settings)
    try:
        cache.make_folders()
    except OSError as error:
        raise UsageError(f"cannot make the shard cache {settings.folder}: {error}") from error
    found = each(lambda url, stat: shard_index(cache, url, stat), urls, infos)
    summaries = [summary for _, summary in found]
    return ShardCatalog(tuple(urls), tuple(path for path, _ in found),
                        np.array([summary.count for summary in summaries], dtype=np.int64),
                        max(summary.max_label for summary in summaries),
                        sum(summary.unlabelled for summary in summaries),
                        sizes=np.array([stat.size for stat in infos], dtype=np.int64), cache=cache)


def shard_infos(urls: Sequence[str]) -> List[ObjectInfo]:
    """Each shard's size and time from a listing of its folder where the store lists (S3, GCS,
    Azure: one request per 1,000 shards), else a HEAD each (HTTP, or a shard the listing lacks)."""
    found: Dict[str, ObjectInfo] = {}
    for folder in sorted({url.rpartition("/")[0] for url in urls}):
        try:
            found.update(listed(folder + "/"))
        except (FileNotFoundError, PermissionError, FetchError):
            pass  # the HEADs below say what is wrong, shard by shard
    missing = [url for url in urls if url not in found]
    found.update(zip(missing, each(checked_info, missing)))
    return [found[url] for url in urls]


def checked_info(url: str) -> ObjectInfo:
    """The object's size and time; a usage error when it, its bucket or the credentials are missing."""
    try:
        return info(url)
    except (FileNotFoundError, PermissionError, FetchError) as error:
        raise UsageError(f"shard {error}") from None


def shard_index(cache: ShardCache, url: str, stat: ObjectInfo) -> Tuple[str, IndexSummary]:
    """The cached index of the shard at ``url`` and its summary, made once per cache (a lock per
    shard: the ranks of a host share the work)."""
    path = str(cache.index_path(url)) + INDEX_SUFFIX
    stamp = (stat.size, stat.modified_ns)
    summary = read_summary(path, stamp)
    if summary is not None:
        return path, summary
    with cache.locked(url + INDEX_SUFFIX):
        summary = read_summary(path, stamp) or adopt_index_beside(url, stamp, path) or build_cached_index(
            cache, url, stamp, path)
    return path, summary


def adopt_index_beside(url: str, stamp: Tuple[int, int], path: str) -> Optional[IndexSummary]:
    """``SHARD.tar.idx.npz`` beside the remote shard (``make_shards.py`` wrote it), when it holds
    the shard's size, saved at ``path`` with the object's stamp; else None."""
    partial = path + ".partial"
    try:
        download(url + INDEX_SUFFIX, partial, Retrying(retries=0))
        if read_summary(partial, stamp, size_only=True) is None:
            return None
        index = load_index(partial)
        write_index(index, stamp, path)
        return summarize(index)
    except FetchError:  # none there (or unreadable): the index is built from the shard
        return None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def build_cached_index(cache: ShardCache, url: str, stamp: Tuple[int, int], path: str) -> IndexSummary:
    """Index the shard downloaded beside its index (where no eviction reaches it), then keep it as
    its cached copy; a usage error naming the URL when it cannot be fetched or is no readable tar
    of images."""
    downloaded = Path(path + ".shard")
    try:
        download(url, str(downloaded), cache.settings.retrying)
        index = build_index(str(downloaded))
        write_index(index, stamp, path)
        cache.keep(url, stamp[0], downloaded)
    except UsageError as error:
        raise UsageError(str(error).replace(str(downloaded), shown(url))) from None
    except (FetchError, OSError) as error:
        raise UsageError(f"cannot index {shown(url)} in the shard cache {cache.root}: {error}") from None
    finally:
        if downloaded.exists():
            downloaded.unlink()
    return summarize(index)
