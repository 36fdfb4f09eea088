"""Which tar shards a ``--data_path`` names: a brace pattern (``a-{000000..000099}.tar``, as bash and
WebDataset expand it), one ``.tar`` file, a folder of them, or a text file listing them; and which
members of a shard are images."""
import os
import re
from pathlib import Path
from typing import List

from image_data.files import ARRAY_EXTENSIONS
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
    if BRACES.search(spec) or spec.endswith(SHARD_SUFFIX):
        return True
    if os.path.isdir(spec):
        with os.scandir(spec) as entries:
            return any(entry.name.endswith(SHARD_SUFFIX) and entry.is_file() for entry in entries)
    return os.path.isfile(spec)


def shard_paths(spec: str) -> List[str]:
    """The shards ``spec`` names, in its order (a folder's sorted); a usage error naming the first
    one that does not exist."""
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
        if not os.path.isfile(path):
            raise UsageError(f"shard {path} (of {spec}) does not exist")
    return paths


def listed_shards(list_file: str) -> List[str]:
    """A text file of shard paths, one a line (``#`` comments and blank lines skipped); relative
    paths are relative to the file's folder."""
    folder = Path(list_file).parent
    try:
        lines = Path(list_file).read_text().splitlines()
    except UnicodeDecodeError as error:
        raise UsageError(f"{list_file} is no text list of shards (nor a .tar shard): {error}") from error
    names = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return [name if os.path.isabs(name) else str(folder / name) for name in names]
