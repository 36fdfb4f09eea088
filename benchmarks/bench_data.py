"""Images/s of the pretraining input pipeline (decode, crop, flip) per loader worker.

It writes its own ImageNet-like JPEG files (500x375, quality 90) and runs each decode path on them
in one thread, as one data-loader worker does: PIL with the MAE transform (what
``datasets.build_pretraining_dataset`` uses), and the tensor decoders of torchvision and torchcodec
with the same augmentation on uint8 tensors. Every path ends with a uint8 crop; batches are
normalized after the copy to the device (``datasets.normalize_on_device``), and the masks made
there, outside the workers. With ``--num_workers`` it also times a whole ``DataLoader``, and on
CUDA it times batched nvJPEG decoding on the GPU. ``--stage finetune`` times finetuning's PIL pipeline instead (crop, flip,
RandAugment; normalization and random erasing run on the device). Prints the fastest path; the
last line is one JSON object.

    python benchmarks/bench_data.py --num_images 200
"""
import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import datasets  # noqa: E402

Decode = Callable[[str], Any]
Sample = Tuple[torch.Tensor, int]


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
    if stage == "finetune":
        return {"pil": (datasets.load_rgb, datasets.build_classification_transform(True, input_size))}
    tensor_transform = datasets.build_tensor_pretraining_transform(input_size)
    paths = {
        "pil": (datasets.load_rgb, datasets.build_pil_pretraining_transform(input_size)),
        "torchvision": (torchvision_decode, tensor_transform),
    }
    if importable("torchcodec.decoders"):
        paths["torchcodec"] = (torchcodec_decode, tensor_transform)
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
        return self.transform(self.decode(self.files[index])), 0  # (3, H, W) uint8, label


def per_worker_rate(samples: Dataset, repeats: int) -> float:
    """Images/s of one thread reading every sample, best of ``repeats`` passes after a warm one."""
    torch.set_num_threads(1)  # what DataLoader sets in each worker
    samples[0]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(len(samples)):
            samples[index]
        best = min(best, time.perf_counter() - start)
    return len(samples) / best


def loader_rate(samples: Dataset, num_workers: int, batch_size: int, device: torch.device, epochs: int = 2) -> float:
    """Images/s out of a DataLoader as the training scripts build it, with the copy to ``device``.
    A first untimed epoch starts the (persistent) workers; whole later epochs are timed, since
    timing after a first batch would count batches the workers prefetched while it was waited for."""
    loader = DataLoader(samples, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=True)
    for _ in loader:
        pass
    start = time.perf_counter()
    for _ in range(epochs):
        for images, _ in loader:
            images.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return epochs * len(loader) * batch_size / (time.perf_counter() - start)


def gpu_batch_rates(files: Sequence[str], input_size: int, batch_size: int, repeats: int) -> Dict[str, float]:
    """Images/s of batched nvJPEG decoding on the GPU, alone and with the same augmentation there
    (crops per image, then the batch normalized as training does); the files are read on the host first."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    transform = datasets.build_tensor_pretraining_transform(input_size)
    encoded = [read_file(path) for path in files]
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]

    def decode(batch: List[torch.Tensor]) -> List[torch.Tensor]:
        return decode_jpeg(batch, mode=ImageReadMode.RGB, device="cuda")  # B x (3, h, w) uint8

    def augment(batch: List[torch.Tensor]) -> torch.Tensor:
        crops = torch.stack([transform(image) for image in decode(batch)])  # (B, 3, H, W) uint8
        return datasets.normalize_on_device(crops, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)

    rates = {}
    for name, work in (("decode", decode), ("decode_augment", augment)):
        work(batches[0])
        best = float("inf")
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for batch in batches:
                work(batch)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        rates[name] = len(files) / best
    return rates


def main(args: argparse.Namespace) -> Dict[str, Any]:
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
                report.setdefault(f"loader_{args.num_workers}_workers_images_per_s", {})[name] = loader_rate(
                    samples, args.num_workers, args.batch_size, device)
        if device.type == "cuda" and args.stage == "pretrain":
            report["gpu_nvjpeg_images_per_s"] = gpu_batch_rates(files, args.input_size, args.batch_size, args.repeats)
    fastest = max(report["per_worker_images_per_s"], key=report["per_worker_images_per_s"].get)
    report["fastest_cpu_path"] = fastest
    print(f"fastest per worker: {fastest}; files average {report['mean_file_kib']:.0f} KiB")
    for key in report:
        if key.startswith("loader_") or key.startswith("gpu_"):
            print(f"{key}: {report[key]}")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(parse_args())
