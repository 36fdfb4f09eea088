"""``bench_data.py --remote``: the pretraining loader reading tar shards from a local S3 server
(``local_s3.py``) through the shard cache, against the same shards as local files: images/s with
the cache cold (a new cache folder) and warm (every shard cached), the cold epoch again without the
prefetch of the next window (what the prefetch hides), and the bytes and requests per sample."""
import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict

import datasets
import make_shards
from image_data import augmentation
from image_data.remote import Counts
from image_data.shard_cache import CacheSettings
from local_s3 import S3Server


def remote_loader(data_path: str, cache: Path, args: argparse.Namespace):
    dataset = datasets.build_pretraining_dataset("image_folder", data_path, augmentation.Crops(args.input_size),
                                                 cache=CacheSettings(str(cache), limit_gb=1000.0))
    loading = datasets.Loading(batch_size=args.batch_size, seed=0, shuffle_window=args.windows[-1],
                               num_workers=args.num_workers)
    return datasets.build_train_loader(dataset, loading)


def timed_epoch(loader, epoch: int) -> Dict[str, float]:
    """One epoch through the loader: images/s, and the bytes and requests per sample it fetched."""
    requests, fetched = Counts.requests, Counts.bytes
    loader.start_epoch(epoch)
    start = time.perf_counter()
    samples = sum(len(images) for images, _ in loader)
    seconds = time.perf_counter() - start
    return {"images_per_s": samples / seconds, "bytes_per_sample": (Counts.bytes - fetched) / samples,
            "requests_per_sample": (Counts.requests - requests) / samples}


def remote_vs_local(args: argparse.Namespace, root: Path, write_jpegs: Callable, local_loader: Callable,
                    epoch_rate: Callable) -> Dict[str, Any]:
    """JPEGs in shards (``make_shards.py``, with their indexes) read locally, then uploaded to
    ``s3://bench/shards/`` and read from there; ``bench_data.py`` lends its writer and loader."""
    (root / "images").mkdir()
    write_jpegs(root / "images", args.num_images)
    converted = make_shards.main(make_shards.get_args_parser().parse_args(
        ["--data_path", str(root / "images"), "--output_dir", str(root / "shards"), "--samples_per_shard",
         str(args.samples_per_shard)]))
    window = args.windows[-1]
    local = local_loader(converted["pattern"], args, args.num_workers, window)
    report: Dict[str, Any] = {"num_images": args.num_images, "samples_per_shard": args.samples_per_shard,
                              "num_workers": args.num_workers, "shuffle_window": window,
                              "local_warm_images_per_s": max(epoch_rate(local, epoch) for epoch in (0, 1, 2))}
    server = S3Server(root / "s3")
    server.start()
    try:
        os.environ.update(server.env)
        server.upload(root / "shards", "s3://bench/shards")
        url = f"s3://bench/shards/{Path(converted['pattern']).name}"
        loader = remote_loader(url, root / "cache", args)
        report["s3_cold"] = timed_epoch(loader, 0)
        report["s3_warm"] = max((timed_epoch(loader, epoch) for epoch in (1, 2)), key=lambda r: r["images_per_s"])
        shutil.rmtree(root / "cache")
        unprefetched = remote_loader(url, root / "cache", args)
        unprefetched.remote.prefetcher.reached = lambda epoch, position: None  # workers ask as they need
        report["s3_cold_without_prefetch"] = timed_epoch(unprefetched, 0)
    finally:
        server.stop()
    for key, value in report.items():
        print(f"{key:>26}: {value}", flush=True)
    return report
