"""Images/s of the pretraining input pipeline (decode, crop, flip) per loader worker.

It writes its own ImageNet-like JPEG files (500x375, quality 90) and runs each decode path on them
in one thread, as one data-loader worker does: PIL with the MAE transform (what
``datasets.build_pretraining_dataset`` uses), and the tensor decoders of torchvision and torchcodec
with the same augmentation on uint8 tensors. Every path ends with a uint8 crop; batches are
normalized after the copy to the device (``image_data.augmentation.normalize_on_device``), and the masks made
there, outside the workers. The device decoder (``--decoder device``) splits the work: its workers
only read the files and draw the crops, and the training device decodes and crops whole batches,
which is timed on its own (on CUDA with nvJPEG, also without the crops). With ``--num_workers`` it
also times a whole ``DataLoader`` through to the uint8 batch on the device. ``--stage finetune``
times finetuning's PIL pipeline instead (crop, flip, RandAugment; normalization and random erasing
run on the device). Prints the fastest path that decodes in the workers; the last line is one
JSON object.

``--shards`` compares the same JPEGs as a folder and as tar shards (``make_shards.py``) through the
pretraining loader as ``run_mae_pretraining.py`` builds it: images/s warm (page cache full) and
cold (every file's pages evicted with ``posix_fadvise(DONTNEED)`` before the epoch), for several
``--shuffle_window``s, the files opened per 1,000 samples, and the time and memory of indexing a
large synthetic set of shards.

    python benchmarks/bench_data.py --num_images 200
    python benchmarks/bench_data.py --shards --num_images 2000 --num_workers 2
    python benchmarks/bench_data.py --remote --num_images 2000 --num_workers 2  # remote_reading.py
"""
import argparse
import builtins
import importlib.util
import io
import json
import os
import sys
import tarfile
import tempfile
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from image_data import augmentation  # noqa: E402
import datasets  # noqa: E402
from image_data import device_decoder  # noqa: E402
from image_data import files as image_files  # noqa: E402
from image_data import shards as image_shards  # noqa: E402
import make_shards  # noqa: E402
from remote_reading import remote_vs_local  # noqa: E402

Decode = Callable[[str], Any]
Sample = Tuple[Any, int]
DEVICE_PATH = "device"  # run_mae_pretraining.py --decoder device: workers read, the training device decodes


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", default=200, type=int, help="JPEG files to write and read")
    parser.add_argument("--stage", default="pretrain", choices=["pretrain", "finetune"],
                        help="whose training pipeline to time")
    parser.add_argument("--input_size", default=224, type=int)
    parser.add_argument("--repeats", default=2, type=int, help="timed passes over the files; the best is kept")
    parser.add_argument("--num_workers", default=0, type=int, help="also time a DataLoader with this many workers")
    parser.add_argument("--batch_size", default=256, type=int, help="loader and GPU-decode batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda adds batched nvJPEG decoding on the GPU")
    parser.add_argument("--shards", action="store_true", help="compare a folder with tar shards of the same JPEGs")
    parser.add_argument("--remote", action="store_true", help="compare local tar shards with the same in a local S3")
    parser.add_argument("--samples_per_shard", default=250, type=int, help="--shards: the shards' size")
    parser.add_argument("--windows", default=[1, 4, 16], type=int, nargs="+", help="--shards: windows to time")
    parser.add_argument("--index_shards", default=200, type=int, help="--shards: shards in the indexing test")
    parser.add_argument("--index_members", default=2000, type=int, help="--shards: samples per indexing shard")
    return parser.parse_args(argv)


def write_jpegs(folder: Path, count: int, seed: int = 0) -> List[str]:
    """ImageNet-like files: smooth random scenes with sensor-like noise, 500x375 at quality 90
    (about ImageNet's median size and file size, so decode costs are representative)."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))  # (h, w, 3)
        scene = np.asarray(coarse.resize((500, 375), Image.BICUBIC), dtype=np.float32)  # (375, 500, 3)
        noisy = np.clip(scene + rng.normal(0, 8, scene.shape), 0, 255).astype(np.uint8)
        path = folder / f"{index:05d}.JPEG"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(str(path))
    return paths


def torchvision_decode(path: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    return decode_jpeg(read_file(path), mode=ImageReadMode.RGB)


def torchcodec_decode(path: str) -> torch.Tensor:
    from torchcodec.decoders import decode_jpeg

    return decode_jpeg(path, mode="RGB")


def cpu_paths(input_size: int, stage: str) -> Dict[str, Tuple[Decode, Callable]]:
    """name: (decode, transform) of every CPU path of ``stage`` that can run here; finetuning has
    PIL only, since timm's RandAugment works on PIL images."""
    crops = augmentation.Crops(input_size)
    if stage == "finetune":
        return {"pil": (image_files.load_rgb, augmentation.build_classification_transform(True, crops))}
    tensor_transform = augmentation.build_tensor_pretraining_transform(crops)
    paths = {
        "pil": (image_files.load_rgb, augmentation.build_pil_pretraining_transform(crops)),
        "torchvision": (torchvision_decode, tensor_transform),
    }
    if importable("torchcodec.decoders"):
        paths["torchcodec"] = (torchcodec_decode, tensor_transform)
    paths[DEVICE_PATH] = (device_decoder.read_encoded, device_decoder.RandomCropBox(crops))
    return paths


def importable(module: str) -> bool:
    """True when ``module`` imports (torchcodec installs but fails to load without its libraries)."""
    try:
        return importlib.util.find_spec(module) is not None and bool(__import__(module))
    except (ImportError, OSError, RuntimeError):
        return False


class PipelineSamples(Dataset):
    """One file through one path: ``(image, label)`` as the training datasets yield."""

    def __init__(self, files: Sequence[str], decode: Decode, transform: Callable) -> None:
        self.files, self.decode, self.transform = files, decode, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        return self.transform(self.decode(self.files[index])), 0  # (3, H, W) uint8 or (bytes, box); label


def per_worker_rate(samples: Dataset, repeats: int) -> float:
    """Images/s of one thread reading every sample, best of ``repeats`` passes after a warm one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what DataLoader sets in each worker
    try:
        return len(samples) / best_time(lambda: [samples[index] for index in range(len(samples))], repeats,
                                        torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)


def loader_rate(samples: Dataset, num_workers: int, batch_size: int, device: torch.device,
                collate_fn: Optional[Callable] = None, epochs: int = 2) -> float:
    """Images/s out of a DataLoader as the training scripts build it, through to the uint8 batch
    on ``device`` (``image_data.device_decoder.batch_images``: the copy, or the device decoder's decode and crop).
    A first untimed epoch starts the (persistent) workers; whole later epochs are timed, since
    timing after a first batch would count batches the workers prefetched while it was waited for."""
    loader = DataLoader(samples, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=True, collate_fn=collate_fn)
    for _ in loader:
        pass
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            device_decoder.batch_images(batch, device)
    torch.get_device_module(device).synchronize(device)
    return epochs * len(loader) * batch_size / (time.perf_counter() - start)


def device_side_rates(files: Sequence[str], input_size: int, batch_size: int, repeats: int,
                      device: torch.device) -> Dict[str, float]:
    """Images/s of the device decoder's share of the step: whole batches of the workers' output,
    collated beforehand, decoded and cropped on ``device`` by ``image_data.device_decoder.crop_on_device``. On CUDA
    also the rate at which the host gets through those calls, before waiting for the GPU: where
    the two are close, the host's part (launching the per-image kernels, and whatever the decoder
    itself waits for) bounds the device decoder, not the GPU's work."""
    crops = device_decoder.RandomCropBox(augmentation.Crops(input_size))
    samples = PipelineSamples(files, device_decoder.read_encoded, crops)
    with datasets.seeded_rngs((0,)):
        encoded = [samples[index] for index in range(len(samples))]
    batches = [device_decoder.collate_encoded(encoded[i : i + batch_size]) for i in range(0, len(encoded), batch_size)]

    def work() -> None:
        for batch in batches:
            device_decoder.crop_on_device(batch, device)

    rates = {f"device_decoder_{device.type}_side_images_per_s": len(files) / best_time(work, repeats, device)}
    if device.type == "cuda":
        host_seconds = best_time(work, repeats, device, include_device=False)
        rates["device_decoder_cuda_host_images_per_s"] = len(files) / host_seconds
    return rates


def nvjpeg_rate(files: Sequence[str], batch_size: int, repeats: int) -> float:
    """Images/s of batched nvJPEG decoding alone (the device decoder's own decoder), the files
    read on the host first."""
    decode = device_decoder.jpeg_batch_decoder()
    encoded = [device_decoder.read_encoded(path).data for path in files]
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    device = torch.device("cuda")
    return len(files) / best_time(lambda: [decode(batch, device) for batch in batches], repeats, device)


def best_time(work: Callable[[], Any], repeats: int, device: torch.device, include_device: bool = True) -> float:
    """Seconds of the fastest of ``repeats`` runs of ``work`` after a warm one: until the device
    work it queued is done, or with ``include_device=False`` until it returns to the host (the
    device drained before each run either way)."""
    work()
    best = float("inf")
    for _ in range(repeats):
        torch.get_device_module(device).synchronize(device)
        start = time.perf_counter()
        work()
        if include_device:
            torch.get_device_module(device).synchronize(device)
        best = min(best, time.perf_counter() - start)
    torch.get_device_module(device).synchronize(device)
    return best


# ----------------------------------------------------------------------------- folder vs shards


def evict(paths: Sequence[str]) -> None:
    """Drop the files' pages from the page cache (without root: clean pages of unmapped files)."""
    for path in paths:
        handle = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(handle)
            os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(handle)


@contextmanager
def counting_opens() -> Any:
    """Count the files this process opens (``open``, ``os.open``): a list holding the count."""
    count = [0]
    original_open, original_os_open = builtins.open, os.open

    def counted_open(*args, **kwargs):
        count[0] += 1
        return original_open(*args, **kwargs)

    def counted_os_open(*args, **kwargs):
        count[0] += 1
        return original_os_open(*args, **kwargs)

    builtins.open, os.open = counted_open, counted_os_open
    try:
        yield count
    finally:
        builtins.open, os.open = original_open, original_os_open


def pretraining_loader(data_path: str, args: argparse.Namespace, num_workers: int, window: int) -> DataLoader:
    """The loader ``run_mae_pretraining.py`` builds (PIL decoder, one process)."""
    dataset = datasets.build_pretraining_dataset("image_folder", data_path, augmentation.Crops(args.input_size))
    loading = datasets.Loading(batch_size=args.batch_size, seed=0, shuffle_window=window, num_workers=num_workers)
    return datasets.build_train_loader(dataset, loading)


def epoch_rate(loader: DataLoader, epoch: int, evicted: Sequence[str] = ()) -> float:
    evict(evicted)
    loader.start_epoch(epoch)
    start = time.perf_counter()
    batches = sum(1 for _ in loader)
    return batches * loader.batch_size / (time.perf_counter() - start)


def opens_per_1000(data_path: str, args: argparse.Namespace, window: int) -> float:
    """Files opened per 1,000 samples of an epoch read in this process (a worker's view)."""
    loader = pretraining_loader(data_path, args, num_workers=0, window=window)
    with counting_opens() as count:
        samples = sum(len(images) for images, _ in loader)
    return 1000 * count[0] / samples


def folder_vs_shards(args: argparse.Namespace, root: Path) -> Dict[str, Any]:
    (root / "images").mkdir()
    files = write_jpegs(root / "images", args.num_images)
    converted = make_shards.main(make_shards.get_args_parser().parse_args(
        ["--data_path", str(root / "images"), "--output_dir", str(root / "shards"), "--samples_per_shard",
         str(args.samples_per_shard)]))
    shards = [str(root / "shards" / shard["path"]) for shard in converted["shards"]]
    sources = {"folder": (str(root / "images"), files, [1])}
    sources["shards"] = (converted["pattern"], shards, args.windows)
    report: Dict[str, Any] = {"num_images": args.num_images, "samples_per_shard": args.samples_per_shard,
                              "num_workers": args.num_workers, "batch_size": args.batch_size}
    for name, (data_path, paths, windows) in sources.items():
        for window in windows:
            label = name if name == "folder" else f"shards_window_{window}"
            loader = pretraining_loader(data_path, args, args.num_workers, window)
            epoch_rate(loader, 0)  # starts the workers and fills the page cache
            report[label] = {"warm_images_per_s": max(epoch_rate(loader, epoch) for epoch in (1, 2)),
                             "cold_images_per_s": max(epoch_rate(loader, epoch, paths) for epoch in (3, 4)),
                             "files_opened_per_1000_samples": opens_per_1000(data_path, args, window)}
            print(f"{label:>18}: {report[label]}", flush=True)
    return report


def fake_shard(path: Path, members: int, rng: np.random.Generator) -> None:
    """A shard of ``members`` samples (1-3 KiB of bytes named .jpg, and a .cls): the headers are what
    indexing reads."""
    with tarfile.open(path, "w") as tar:
        for index in range(members):
            for name, data in ((f"{index:08d}.jpg", bytes(int(rng.integers(1024, 3072)))),
                               (f"{index:08d}.cls", str(index % 1000).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def indexing_cost(args: argparse.Namespace, root: Path) -> Dict[str, Any]:
    """Index ``--index_shards`` shards of ``--index_members`` samples: first (building) and again
    (cached). Each is timed on its own, then run again under ``tracemalloc`` (which slows Python
    several times) for its peak memory."""
    rng = np.random.default_rng(0)
    folder = root / "index_test"
    folder.mkdir()
    for shard in range(args.index_shards):
        fake_shard(folder / f"s-{shard:06d}.tar", args.index_members, rng)
    spec = str(folder / f"s-{{000000..{args.index_shards - 1:06d}}}.tar")
    report = {"shards": args.index_shards, "samples": args.index_shards * args.index_members}
    for run in ("build", "cached"):
        for traced in (False, True):
            if run == "build":
                for index in folder.glob(f"*{image_shards.INDEX_SUFFIX}"):
                    index.unlink()
            if traced:
                tracemalloc.start()
            start = time.perf_counter()
            catalog = image_shards.catalog_shards(spec, None)
            if traced:
                report[f"{run}_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
                tracemalloc.stop()
            else:
                report[f"{run}_seconds"] = time.perf_counter() - start
    report["build_samples_per_s"] = report["samples"] / report["build_seconds"]
    report["index_bytes_per_sample"] = sum(os.path.getsize(path) for path in catalog.index_paths) / report["samples"]
    print(f"indexing: {report}", flush=True)
    return report


def main(args: argparse.Namespace) -> Dict[str, Any]:
    if args.remote:
        with tempfile.TemporaryDirectory() as folder:
            report = {"remote_vs_local": remote_vs_local(args, Path(folder), write_jpegs, pretraining_loader,
                                                         epoch_rate)}
        print(json.dumps(report))
        return report
    if args.shards:
        with tempfile.TemporaryDirectory() as folder:
            report = {"folder_vs_shards": folder_vs_shards(args, Path(folder)),
                      "indexing": indexing_cost(args, Path(folder))}
        print(json.dumps(report))
        return report
    device = torch.device(args.device)
    report: Dict[str, Any] = {"stage": args.stage, "num_images": args.num_images, "per_worker_images_per_s": {}}
    with tempfile.TemporaryDirectory() as folder:
        files = write_jpegs(Path(folder), args.num_images)
        report["mean_file_kib"] = float(np.mean([Path(path).stat().st_size for path in files]) / 1024)
        for name, (decode, transform) in cpu_paths(args.input_size, args.stage).items():
            samples = PipelineSamples(files, decode, transform)
            rate = per_worker_rate(samples, args.repeats)
            report["per_worker_images_per_s"][name] = rate
            print(f"{name:>12}: {rate:7.1f} images/s per worker")
            if args.num_workers:
                collate = device_decoder.collate_encoded if name == DEVICE_PATH else None
                report.setdefault(f"loader_{args.num_workers}_workers_images_per_s", {})[name] = loader_rate(
                    samples, args.num_workers, args.batch_size, device, collate)
        if args.stage == "pretrain":
            report.update(device_side_rates(files, args.input_size, args.batch_size, args.repeats, device))
            if device.type == "cuda":
                report["nvjpeg_decode_only_images_per_s"] = nvjpeg_rate(files, args.batch_size, args.repeats)
    decoding_in_workers = {name: rate for name, rate in report["per_worker_images_per_s"].items()
                           if name != DEVICE_PATH}
    fastest = max(decoding_in_workers, key=decoding_in_workers.get)
    report["fastest_cpu_path"] = fastest
    print(f"fastest per worker of the paths that decode there: {fastest}; files average "
          f"{report['mean_file_kib']:.0f} KiB")
    for key in report:
        if key.startswith(("loader_", "device_", "nvjpeg_")):
            print(f"{key}: {report[key]}")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(parse_args())
