"""MNIST-style IDX files (``train-images-idx3-ubyte[.gz]`` and the like) as a labelled dataset:
Fashion-MNIST as Debian's ``dataset-fashion-mnist`` installs it, in ``/usr/share/datasets/fashion-mnist``.

An IDX file is a 4-byte magic number (two zero bytes, the element type, the number of dimensions),
one big-endian 4-byte size per dimension, then the elements in C order (LeCun's format). Only
unsigned bytes are read, which is what image and label files hold. The whole split is kept in
memory (47 MB for Fashion-MNIST's 60,000 images of 28 x 28), shared by the loader's workers.
"""
import gzip
import os
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

UBYTE = 0x08  # the element type of image and label files
SPLIT_FILES = {  # split -> (images, labels), as LeCun and Zalando name them
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
DEBIAN_FOLDER = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist


def idx_path(folder: str, name: str) -> str:
    """``folder/name``, or ``folder/name.gz`` when only that exists; a ``FileNotFoundError`` naming both."""
    for candidate in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{os.path.join(folder, name)}[.gz] does not exist: --data_path names the folder of the "
                            "four IDX files (for Fashion-MNIST: apt-get install dataset-fashion-mnist, then "
                            f"--data_path {DEBIAN_FOLDER})")


def read_idx(path: str, dims: int) -> np.ndarray:
    """The array an IDX file of unsigned bytes with ``dims`` dimensions holds; a ``ValueError``
    naming the file for a wrong magic number or a file shorter or longer than its header says."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:  # a truncated or corrupt gzip stream
        raise ValueError(f"{path} cannot be read as an IDX file: {error}") from error
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != UBYTE or data[3] != dims:
        raise ValueError(f"{path} is no IDX file of {dims}-dimensional unsigned bytes (magic number "
                         f"{data[:4].hex() or 'missing'}, expected 000008{dims:02x})")
    header = 4 + 4 * dims
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(f"{path} holds {len(data)} bytes where its header {shape} says {expected}: truncated or "
                         "damaged")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_split(folder: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """(N, H, W) images and (N,) labels of ``split`` (train or val, the test files); checked to agree."""
    images_name, labels_name = SPLIT_FILES[split]
    images = read_idx(idx_path(folder, images_name), dims=3)
    labels = read_idx(idx_path(folder, labels_name), dims=1)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


class IdxImages(Dataset):
    """A split of IDX images as (image, label) samples through ``transform``, in the form an image
    file of the same pixels takes (``image_data.files.load_image``): for ``in_chans`` 1 a (1, H, W)
    float tensor in [0, 1], for 3 the gray in an RGB PIL image."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Optional[Callable] = None,
                 in_chans: int = 1) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"IDX images are grayscale: --in_chans 1 (or 3, the gray repeated), not {in_chans}")
        self.images, self.labels, self.transform, self.in_chans = images, labels, transform, in_chans
        self.classes: List[str] = [str(label) for label in range(int(labels.max()) + 1)] if len(labels) else []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        pixels = self.images[index]  # (H, W) uint8
        if self.in_chans == 3:
            image = Image.fromarray(pixels, mode="L").convert("RGB")
        else:
            image = torch.from_numpy(pixels[None].astype(np.float32) / 255.0)  # (1, H, W)
        return (self.transform(image) if self.transform else image), int(self.labels[index])
