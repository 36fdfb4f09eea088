"""Which tar shards a ``--data_path`` names: a brace pattern (``a-{000000..000099}.tar``, as bash and
WebDataset expand it), one ``.tar`` file, a folder of them, or a text file listing them, each either
local or in object storage (``s3://``, ``gs://``, ``az://``, ``https://``: a prefix ending in ``/``
stands for the folder); and which members of a shard are images."""
import os
import re
from pathlib import Path
from typing import List

from image_data.files import ARRAY_EXTENSIONS
from image_data.remote import FetchError, is_remote, listing, read_bytes
from utils import UsageError

SHARD_SUFFIX = ".tar"
# image members, the first found taking a sample's place, as timm's and WebDataset's decoders look
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "bmp", "tif", "tiff") + tuple(
    extension.lstrip(".") for extension in ARRAY_EXTENSIONS
)

BRACES = re.compile(r"\{([^{}]*)\}")
RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def expand_braces(pattern: str) -> List[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept), ``{x,y}`` -> x, y;
    several braces multiply out, as bash and WebDataset expand them."""
    match = BRACES.search(pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end():], match.group(1)
    numbers = RANGE.match(body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(value).zfill(width) for value in range(int(first), int(last) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise UsageError(f"{pattern}: {{{body}}} is neither a range {{000..099}} nor a list {{a,b}}")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def is_shard_spec(spec: str) -> bool:
    """True when ``spec`` names tar shards: a brace pattern, a ``.tar`` file, a folder holding
    ``.tar`` files, or a text file that lists shards (any other existing file)."""
    if BRACES.search(spec) or spec.endswith(SHARD_SUFFIX) or is_remote(spec):
        return True
    if os.path.isdir(spec):
        with os.scandir(spec) as entries:
            return any(entry.name.endswith(SHARD_SUFFIX) and entry.is_file() for entry in entries)
    return os.path.isfile(spec)


def shard_paths(spec: str) -> List[str]:
    """The shards ``spec`` names, in its order (a folder's sorted); a usage error naming the first
    one that does not exist (shards in object storage are checked when they are catalogued)."""
    if is_remote(spec):
        return remote_shard_urls(spec)
    if os.path.isdir(spec):
        paths = sorted(str(path) for path in Path(spec).glob(f"*{SHARD_SUFFIX}") if path.is_file())
    elif BRACES.search(spec) or spec.endswith(SHARD_SUFFIX):
        paths = expand_braces(spec)
    elif os.path.isfile(spec):
        if Path(spec).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
            raise UsageError(f"{spec} is one image file; name the folder that holds the images "
                             f"({Path(spec).parent}), or tar shards")
        paths = listed_shards(spec)
    else:
        raise UsageError(f"{spec} is neither an image folder nor tar shards")
    if not paths:
        raise UsageError(f"{spec} names no shards")
    for path in paths:
        if not is_remote(path) and not os.path.isfile(path):
            raise UsageError(f"shard {path} (of {spec}) does not exist")
    return paths


def listed_shards(list_file: str) -> List[str]:
    """A text file of shard paths, one a line (``#`` comments and blank lines skipped); relative
    paths are relative to the file's folder."""
    try:
        return listed_names(Path(list_file).read_bytes(), list_file, str(Path(list_file).parent))
    except OSError as error:
        raise UsageError(f"cannot read the list of shards {list_file}: {error}") from error


def listed_names(data: bytes, list_file: str, folder: str) -> List[str]:
    """The shards a list file's ``data`` names, one a line (``#`` comments and blank lines
    skipped); names neither absolute nor URLs are relative to ``folder``."""
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UsageError(f"{list_file} is no text list of shards (nor a .tar shard): {error}") from error
    names = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return [name if os.path.isabs(name) or is_remote(name) else joined(folder, name) for name in names]


def joined(folder: str, name: str) -> str:
    return f"{folder}/{name}" if is_remote(folder) else str(Path(folder) / name)


def remote_shard_urls(spec: str) -> List[str]:
    """The shard URLs of a pattern or ``.tar`` URL, of a prefix ending in ``/`` (its ``.tar``
    objects, sorted) or of a list file in object storage."""
    try:
        if BRACES.search(spec) or spec.endswith(SHARD_SUFFIX):
            urls = expand_braces(spec)
        elif spec.endswith("/"):
            urls = listing(spec, SHARD_SUFFIX)
        else:
            urls = listed_names(read_bytes(spec), spec, spec.rpartition("/")[0])
    except (FileNotFoundError, PermissionError, FetchError) as error:
        raise UsageError(str(error)) from None
    if not urls:
        raise UsageError(f"{spec} names no shards")
    return urls
