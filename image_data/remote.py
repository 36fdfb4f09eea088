"""Objects in S3, GCS, Azure or behind HTTP, through obstore (one Rust client for all four: a
64 MB GET from a local S3 server in 0.10 s against s3fs's 0.46 s, imported in 0.01 s against
0.31 s; benchmarks/RESULTS.md, "Shards from object storage").

Credentials, regions and endpoints come from each cloud's own environment (``AWS_*`` with
``AWS_ENDPOINT_URL`` for S3-compatible stores, ``GOOGLE_*``, ``AZURE_*``), never from our flags,
and a URL is shown without its query string, where a signed URL keeps its token. obstore's own
retries are off: ``download`` retries transient errors itself, with backoff, and counts them.
"""
import errno
import os
import sys
import time
from typing import Dict, List, NamedTuple, Tuple
from urllib.parse import urlsplit

import obstore
import obstore.exceptions
from obstore.exceptions import NotFoundError, PermissionDeniedError, UnauthenticatedError
from obstore.store import from_url

SCHEMES = ("s3", "gs", "az", "abfs", "http", "https")
CHUNK = 8 << 20  # bytes a download writes at a time
TIMEOUTS = {"connect_timeout": "10s", "timeout": "120s"}
MISSING = (NotFoundError, FileNotFoundError)
REFUSED = (PermissionDeniedError, UnauthenticatedError)
LOCAL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)  # the cache's disk, not the network


class FetchError(RuntimeError):
    """An object that could not be fetched after every retry (not an ``OSError``, so a loader
    does not take it for one unreadable image and skip it)."""


class ObjectInfo(NamedTuple):
    size: int
    modified_ns: int  # the store's last-modified time: with the size, what tells a changed object


def is_remote(spec: str) -> bool:
    return urlsplit(spec).scheme in SCHEMES and "://" in spec


def shown(url: str) -> str:
    """``url`` fit for a log line: without its query string (a signed URL's token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def split(url: str) -> Tuple[str, str]:
    """``s3://bucket/a/b.tar`` -> (``s3://bucket``, ``a/b.tar``): the store's root and the key."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/")


def endpoint_is_plain_http() -> bool:
    endpoint = os.environ.get("AWS_ENDPOINT_URL", os.environ.get("AWS_ENDPOINT", ""))
    return endpoint.startswith("http://")


STORES: Dict[str, object] = {}


def store_for(root: str):
    """One client per store root. Only a process that did not inherit it by fork may use it
    (obstore's runtime does not survive a fork): ``image_data.shard_cache`` keeps loader workers off it."""
    if root not in STORES:
        scheme = urlsplit(root).scheme
        plain = scheme == "http" or (scheme == "s3" and endpoint_is_plain_http())
        options = {**TIMEOUTS, **({"allow_http": True} if plain else {})}
        STORES[root] = from_url(root, client_options=options, retry_config={"max_retries": 0})
    return STORES[root]


def info(url: str) -> ObjectInfo:
    """The object's size and last-modified time; ``FileNotFoundError`` when it (or its bucket) is
    missing, ``PermissionError`` when the credentials are refused."""
    root, key = split(url)
    try:
        meta = obstore.head(store_for(root), key)
    except MISSING as error:
        raise FileNotFoundError(f"{shown(url)} does not exist") from error
    except REFUSED as error:
        raise PermissionError(f"{shown(url)}: access refused; check the credentials in the environment "
                              f"({first_line(error)})") from error
    except obstore.exceptions.BaseError as error:
        raise FetchError(f"{shown(url)}: {first_line(error)}") from None
    return ObjectInfo(int(meta["size"]), int(meta["last_modified"].timestamp() * 1e9))


def listing(prefix_url: str, suffix: str) -> List[str]:
    """The URLs of the objects right under ``prefix_url`` whose names end in ``suffix``, sorted."""
    return sorted(url for url in listed(prefix_url) if url.endswith(suffix))


def listed(prefix_url: str) -> Dict[str, ObjectInfo]:
    """The objects right under ``prefix_url``, each URL's size and time: one request per 1,000
    objects, where a HEAD each would be one per object."""
    root, key = split(prefix_url)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    try:
        found = obstore.list_with_delimiter(store_for(root), prefix or None)
    except MISSING as error:
        raise FileNotFoundError(f"{shown(prefix_url)} does not exist") from error
    except REFUSED as error:
        raise PermissionError(f"{shown(prefix_url)}: access refused ({first_line(error)})") from error
    except obstore.exceptions.BaseError as error:
        raise FetchError(f"{shown(prefix_url)}: {first_line(error)}") from None
    return {f"{root}/{entry['path']}": ObjectInfo(int(entry["size"]), int(entry["last_modified"].timestamp() * 1e9))
            for entry in found["objects"]}


def read_bytes(url: str) -> bytes:
    root, key = split(url)
    try:
        return bytes(obstore.get(store_for(root), key).bytes())
    except MISSING as error:
        raise FileNotFoundError(f"{shown(url)} does not exist") from error
    except obstore.exceptions.BaseError as error:
        raise FetchError(f"{shown(url)}: {first_line(error)}") from None


def upload(path: str, url: str) -> None:
    root, key = split(url)
    with open(path, "rb") as file:
        obstore.put(store_for(root), key, file.read())


class Retrying(NamedTuple):
    """How ``download`` meets transient errors (timeouts, 5xx, throttling, dropped connections):
    ``retries`` more tries, waiting ``first_wait`` seconds and doubling up to ``max_wait``."""

    retries: int = 6
    first_wait: float = 1.0
    max_wait: float = 30.0

    def waits(self) -> List[float]:
        return [min(self.max_wait, self.first_wait * 2 ** attempt) for attempt in range(self.retries)]


class Counts:
    """What this process fetched: the benchmark's bytes and requests per sample, and the retries."""

    requests = 0
    bytes = 0
    retries = 0


def download(url: str, destination: str, retrying: Retrying) -> int:
    """Write the object at ``url`` to ``destination`` (truncated first), retrying transient
    errors with a warning each; its size. ``FetchError`` when every try failed or the object is
    gone; an ``OSError`` of the local disk (a full one) passes through."""
    root, key = split(url)
    waits = retrying.waits()
    for attempt, wait in enumerate([*waits, None]):
        Counts.requests += 1
        try:
            return write_object(store_for(root), key, destination)
        except MISSING as error:
            raise FetchError(f"{shown(url)} no longer exists") from error
        except REFUSED as error:
            raise FetchError(f"{shown(url)}: access refused ({first_line(error)})") from error
        except Exception as error:  # obstore's GenericError and friends: the network, the server
            if isinstance(error, OSError) and error.errno in LOCAL_DISK:
                raise
            if wait is None:
                raise FetchError(f"cannot fetch {shown(url)} after {attempt + 1} tries: {first_line(error)}") from None
            Counts.retries += 1
            sys.stderr.write(f"warning: fetching {shown(url)} failed ({first_line(error)}); retry {attempt + 1} "
                             f"of {len(waits)} in {wait:g} s\n")  # one write: other threads print meanwhile
            sys.stderr.flush()
            time.sleep(wait)
    raise AssertionError("unreachable")


def write_object(store, key: str, destination: str) -> int:
    written = 0
    with open(destination, "wb") as file:
        for chunk in obstore.get(store, key).stream(min_chunk_size=CHUNK):
            file.write(chunk)
            written += len(chunk)
    Counts.bytes += written
    return written


def first_line(error: BaseException) -> str:
    """obstore's messages carry a debug dump after their first line; the first line says it."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
