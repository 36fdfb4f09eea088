"""Image folder -> WebDataset tar shards: ``python make_shards.py --data_path /imagenet/train
--output_dir /data/in1k-shards --prefix train``.

The folder's images (ImageFolder layout, or flat without labels) go into shards of
``--samples_per_shard`` in one shuffled, seeded order, each sample as ``KEY.<ext>`` holding the
file's bytes unchanged (nothing is decoded or re-encoded) and, with class folders, ``KEY.cls``
holding its class number (the sorted folder names' order, as ``ImageFolder`` numbers them). Each
shard is written under a temporary name and renamed when complete, with its index beside it
(``image_data.shards``), and ``PREFIX.json`` sums the conversion up (samples per shard, classes) once
every shard is written; run again, an unfinished conversion starts over.

``--index SHARDS`` only indexes existing shards (Hugging Face's ``-wds`` downloads, say), in
``--num_workers`` processes, so that the first training run does not have to; shards in object
storage (``s3://BUCKET/PREFIX/``, ...) are read through a cache under ``--output_dir`` and get their
index uploaded beside them.
"""
import argparse
import io
import json
import multiprocessing
import os
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

import utils
from image_data.files import class_folders, find_images, has_class_folders
from image_data.remote import is_remote, upload
from image_data.shard_index import INDEX_SUFFIX, LABEL_EXTENSION, build_index, shard_stamp, write_index
from image_data.shard_names import shard_paths
from image_data.shards import catalog_shards
from training.config_file import ConfigArgumentParser


def get_args_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", help="the image folder to convert (ImageFolder layout or flat)")
    parser.add_argument("--output_dir", help="where the shards go (with --index: where the indexes of shards in "
                                             "read-only folders go)")
    parser.add_argument("--prefix", default="shard", help="shards are PREFIX-000000.tar, ...; the summary PREFIX.json")
    parser.add_argument("--samples_per_shard", default=1000, type=int, help="images per shard (the last has the rest)")
    parser.add_argument("--seed", default=0, type=int, help="seeds the shuffled order of the images")
    parser.add_argument("--index", default=None, metavar="SHARDS",
                        help="instead of converting, index these shards (a pattern, folder or list file)")
    parser.add_argument("--num_workers", default=8, type=int, help="--index: processes")
    return parser


def labelled_images(root: str) -> Tuple[List[str], Optional[List[int]], Optional[List[str]]]:
    """(paths, class numbers, class names) of an ImageFolder layout; (paths, None, None) when flat."""
    if has_class_folders(root):
        classes = class_folders(root)
        paths, labels = [], []
        for number, name in enumerate(classes):
            found = find_images(os.path.join(root, name))
            paths += found
            labels += [number] * len(found)
        return paths, labels, classes
    return find_images(root), None, None


def member_key(position: int, path: str) -> str:
    """A key unique in the conversion and free of dots (WebDataset's key ends at the first dot):
    the position in the shuffled order, then the file's name without its extension."""
    stem = Path(path).stem.replace(".", "_")
    return f"{position:09d}_{stem}"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: Sequence[Tuple[int, str, Optional[int]]]) -> int:
    """``samples`` (position, file, label) into the tar ``path``, atomically, then its index beside
    it; returns the shard's bytes."""
    with utils.atomic_write(path) as tmp:
        with tarfile.open(tmp, mode="w") as tar:
            for position, source, label in samples:
                key = member_key(position, source)
                add_member(tar, f"{key}{Path(source).suffix.lower()}", Path(source).read_bytes())
                if label is not None:
                    add_member(tar, f"{key}.{LABEL_EXTENSION}", f"{label}\n".encode())
    write_index(build_index(str(path)), shard_stamp(str(path)), str(path) + INDEX_SUFFIX)
    return path.stat().st_size


def convert(args: argparse.Namespace) -> Dict[str, object]:
    """Write the shards and the summary; returns the summary."""
    if not args.data_path or not os.path.isdir(args.data_path):
        raise utils.UsageError(f"--data_path {args.data_path} is not a directory")
    if not args.output_dir:
        raise utils.UsageError("--output_dir is needed: where the shards go")
    if args.samples_per_shard < 1:
        raise utils.UsageError(f"--samples_per_shard must be at least 1, got {args.samples_per_shard}")
    summary_path = Path(args.output_dir) / f"{args.prefix}.json"
    if summary_path.exists():
        raise utils.UsageError(f"{summary_path} exists: {args.output_dir} already holds a finished conversion; "
                               "choose another --output_dir or --prefix")
    paths, labels, classes = labelled_images(args.data_path)
    if not paths:
        raise utils.UsageError(f"no images found under {args.data_path}")
    utils.check_writable_dir(args.output_dir, "--output_dir")
    order = np.random.default_rng(args.seed).permutation(len(paths))  # (N,)
    shards = []
    for first in range(0, len(paths), args.samples_per_shard):
        chosen = order[first:first + args.samples_per_shard].tolist()
        path = Path(args.output_dir) / f"{args.prefix}-{len(shards):06d}.tar"
        size = write_shard(path, [(first + offset, paths[index], None if labels is None else labels[index])
                                  for offset, index in enumerate(chosen)])
        shards.append({"path": path.name, "samples": len(chosen), "bytes": size})
        print(f"wrote {path}: {len(chosen)} images, {size / 1e6:.1f} MB", flush=True)
    last = len(shards) - 1
    summary = {
        "data_path": str(args.data_path), "seed": args.seed, "samples": len(paths), "samples_per_shard":
        args.samples_per_shard, "pattern": str(Path(args.output_dir) / f"{args.prefix}-{{000000..{last:06d}}}.tar"),
        "classes": classes, "shards": shards,
    }
    with utils.atomic_write(summary_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{len(paths)} images in {len(shards)} shards: --data_path '{summary['pattern']}'")
    return summary


def index_shard(shard_and_dir: Tuple[str, Optional[str]]) -> Union[int, str]:
    """Index one shard (a worker's job): its sample count, or what is wrong with it. The index of
    a shard in object storage is uploaded beside it, where every run's catalog finds it."""
    shard, index_dir = shard_and_dir
    try:
        catalog = catalog_shards(shard, index_dir)
        if is_remote(shard):
            upload(catalog.index_paths[0], shard + INDEX_SUFFIX)
        return int(catalog.counts[0])
    except utils.UsageError as error:
        return str(error)


def index(args: argparse.Namespace) -> int:
    """Index every shard of ``--index`` that has no current index; returns the samples."""
    shards = shard_paths(args.index)
    with multiprocessing.get_context("spawn").Pool(max(1, args.num_workers)) as pool:
        results = pool.map(index_shard, [(shard, args.output_dir) for shard in shards], chunksize=1)
    errors = [result for result in results if isinstance(result, str)]
    if errors:
        raise utils.UsageError(errors[0] + (f" (and {len(errors) - 1} more bad shards)" if len(errors) > 1 else ""))
    print(f"indexed {len(shards)} shards: {sum(results)} samples")
    return sum(results)


def main(args: argparse.Namespace) -> object:
    return index(args) if args.index else convert(args)


if __name__ == "__main__":
    utils.exit_on_usage_error(main, get_args_parser().parse_args())
