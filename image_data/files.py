"""Reading image files: PIL's loader and the tensor decoders, images of any channel count
(grayscale, 16-bit, ``.npy`` arrays), finding the images of a folder (ImageFolder layout or flat),
and skipping and counting the files that cannot be read or are too large, so one bad file never
stops a run.

PIL's own decompression-bomb check (a warning above ``Image.MAX_IMAGE_PIXELS``, an error above
twice that, which would stop a run) is replaced on import by ``check_image_size``: the same default
limit, every decoder, a skip, and a message that names the file and ``--max_image_pixels``.
"""
import functools
import io
import multiprocessing
import os
import warnings
from typing import BinaryIO, Callable, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from utils import all_reduce_sum

DEFAULT_MAX_IMAGE_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # what PIL refuses by default (178,956,970 pixels)
Image.MAX_IMAGE_PIXELS = None  # check_image_size does it, for every decoder


# ----------------------------------------------------------------------------- reading one file


class MemberBytes(NamedTuple):
    """An image read into memory (a tar shard's member), which every loader takes in place of a
    path: nothing is extracted to disk."""

    name: str  # "SHARD.tar:KEY.jpg": for messages, and the extension picks the reader
    data: bytes


ImageSource = Union[str, MemberBytes]


def source_name(source: ImageSource) -> str:
    return source if isinstance(source, str) else source.name


def opened(source: ImageSource) -> Union[str, BinaryIO]:
    """What ``Image.open`` and ``np.load`` read: the path, or the bytes as a file."""
    return source if isinstance(source, str) else io.BytesIO(source.data)


def source_bytes(source: ImageSource) -> np.ndarray:
    """(n,) uint8: the file's bytes, read once, in a writable array (as ``torch.from_numpy`` wants)."""
    if isinstance(source, str):
        return np.fromfile(source, dtype=np.uint8)
    return np.frombuffer(bytearray(source.data), dtype=np.uint8)


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit ('I;16*') and 32-bit integer ('I') greyscale, read as 16-bit range, to 8-bit 'L';
    PIL's own conversion clips at 255 instead of scaling, which turns most pixels white."""
    values = np.asarray(image).astype(np.int64)  # (H, W)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), mode="L")


class ImageTooLargeError(ValueError):
    """More pixels than ``--max_image_pixels``: skipped like an unreadable file."""


def check_image_size(image: Image.Image, max_pixels: int) -> None:
    """Refuse an opened (not yet decoded) image over ``max_pixels`` pixels."""
    if image.width * image.height > max_pixels:
        raise ImageTooLargeError(f"{image.width} x {image.height} pixels is over --max_image_pixels {max_pixels}; "
                                 "raise it for datasets of large images")


def load_rgb(path: Union[str, BinaryIO], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Any image file (a path or an open binary file) of at most ``max_pixels`` pixels as 8-bit RGB:
    the one PIL loader for every folder dataset here."""
    with Image.open(path) as image:
        check_image_size(image, max_pixels)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # the route PIL asks for; direct P -> RGB warns
        elif image.mode == "I" or image.mode.startswith("I;16"):
            image = to_8bit(image)
        return image.convert("RGB")


@functools.lru_cache(maxsize=None)
def file_decoder() -> Callable[[torch.Tensor], torch.Tensor]:
    """torchcodec's image decoder where it is installed (torchvision 0.29 deprecates its own),
    else ``torchvision.io``'s; both take the (n,) uint8 bytes of a file and give (3, H, W) RGB.
    Chosen once per process, since a failed import is retried, and searched for on disk, every
    time it runs."""
    try:
        from torchcodec.decoders import decode_image
    except ImportError:
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_image as decode_bytes

        return lambda data: decode_bytes(data, mode=ImageReadMode.RGB)
    return lambda data: decode_image(data, mode="RGB")


ARRAY_EXTENSIONS = (".npy",)
RGB = 3
FULL_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}  # what 1.0 is, per integer dtype


def load_image(
    source: ImageSource, in_chans: int = RGB, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Union[Image.Image, torch.Tensor]:
    """An image of ``in_chans`` channels: RGB as an 8-bit PIL image (``load_rgb``), any other
    channel count as a (C, H, W) float32 tensor in [0, 1], which keeps 16-bit precision. Image
    files give 1 channel (grayscale, 16-bit included) or 4 (RGBA); ``.npy`` arrays give any."""
    if source_name(source).lower().endswith(ARRAY_EXTENSIONS):
        return load_array(opened(source), in_chans, max_pixels)
    if in_chans == RGB:
        return load_rgb(opened(source), max_pixels)
    with Image.open(opened(source)) as image:
        check_image_size(image, max_pixels)
        if in_chans == 1 and (image.mode == "I" or image.mode.startswith("I;16")):
            pixels = np.clip(np.asarray(image).astype(np.float32), 0, 65535) / 65535.0  # (H, W)
        elif in_chans == 1 and image.mode == "F":
            pixels = np.asarray(image, dtype=np.float32)  # (H, W), as stored
            check_finite(pixels)
        elif in_chans in (1, 4):
            pixels = np.asarray(image.convert("L" if in_chans == 1 else "RGBA"), dtype=np.float32) / 255.0
        else:
            raise ValueError(f"image files hold 1, 3 or 4 channels, not --in_chans {in_chans}: store "
                             f"{in_chans}-channel images as .npy arrays")
    return torch.from_numpy(np.ascontiguousarray(pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1)))


def load_array(path: Union[str, BinaryIO], in_chans: int, max_pixels: int) -> Union[Image.Image, torch.Tensor]:
    """A ``.npy`` image: (H, W), (C, H, W) or (H, W, C); channels first wins when both ends have
    ``in_chans`` entries. uint8 and uint16 are scaled to [0, 1], floats taken as they are. RGB
    arrays must be uint8 and become PIL images, for the RGB pipeline (RandAugment included)."""
    array = np.load(path, allow_pickle=False)  # never unpickles
    if array.ndim == 2:
        array = array[None]  # (1, H, W)
    elif not (array.ndim == 3 and in_chans in (array.shape[0], array.shape[-1])):
        raise ValueError(f"an array of shape {array.shape} is no {in_chans}-channel image ((H, W, {in_chans}) "
                         f"or ({in_chans}, H, W)); set --in_chans to its channel count")
    elif array.shape[0] != in_chans:
        array = array.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    if array.shape[0] != in_chans:
        raise ValueError(f"an array of {array.shape[0]} channel(s) is no {in_chans}-channel image")
    if array.shape[1] * array.shape[2] > max_pixels:
        raise ImageTooLargeError(f"{array.shape[2]} x {array.shape[1]} pixels is over --max_image_pixels {max_pixels}")
    if in_chans == RGB:
        if array.dtype != np.uint8:
            raise ValueError(f"3-channel arrays go through the RGB pipeline and must be uint8, not {array.dtype}")
        return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")
    if array.dtype.kind in "iu" and array.dtype not in FULL_SCALE:
        raise ValueError(f"integer arrays are uint8 or uint16, not {array.dtype}; store others as floats")
    scaled = array.astype(np.float32) / FULL_SCALE.get(array.dtype, 1.0)
    check_finite(scaled)
    return torch.from_numpy(np.ascontiguousarray(scaled))


class NonFiniteImageError(ValueError):
    """A float image holding NaN or infinite values: bad input, skipped like an unreadable file."""


def check_finite(pixels: np.ndarray) -> None:
    """Refuse NaN and infinities, which would make the loss NaN and stop the run for bad input."""
    if not np.isfinite(pixels).all():
        bad = int((~np.isfinite(pixels)).sum())
        raise NonFiniteImageError(f"{bad} of its {pixels.size} values are NaN or infinite")


def decode_rgb(source: ImageSource, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Any image file of at most ``max_pixels`` pixels as a (3, H, W) RGB tensor (uint8; uint16 for
    16-bit PNGs), decoded without PIL, which only reads the size from the header first. Formats
    the tensor decoder does not take (BMP, TIFF, ...) are decoded by PIL instead; a file neither
    can decode raises ``OSError``, so ``SkipUnreadable`` skips it."""
    try:
        with Image.open(opened(source)) as image:
            check_image_size(image, max_pixels)
    except (OSError, SyntaxError):  # PIL cannot read it: the decoder below judges the file
        pass
    data = torch.from_numpy(source_bytes(source))  # (n,) uint8
    try:
        return file_decoder()(data)
    except (RuntimeError, ValueError) as error:
        try:
            rgb = np.array(load_rgb(opened(source), max_pixels))  # (H, W, 3)
            return torch.from_numpy(rgb).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        except (OSError, SyntaxError, ValueError):
            raise OSError(f"cannot decode {source_name(source)}: {error}") from error


# ----------------------------------------------------------------------------- unreadable files


# what PIL raises for truncated or foreign files (ImageTooLargeError is a ValueError), and its own
# decompression-bomb error, should anything set PIL's limit again
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class NoReadableImageError(FileNotFoundError):
    """Every file of a dataset failed to read."""


class UnreadableImageError(Exception):
    """A file that could not be read or decoded, or is too large: what ``SkipUnreadable`` skips.
    Only a loader wrapped in ``ReadErrors`` raises it, so an error of a transform is never taken
    for a bad file."""

    def __init__(self, path: str, cause: BaseException) -> None:
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = path, cause


class ReadErrors:
    """A loader (of a path or a ``MemberBytes``) whose read and decode errors become
    ``UnreadableImageError``."""

    def __init__(self, loader: Callable[[ImageSource], object]) -> None:
        self.loader = loader

    def __call__(self, source: ImageSource) -> object:
        try:
            return self.loader(source)
        except UNREADABLE as error:
            raise UnreadableImageError(source_name(source), error) from error


class SkipUnreadable(Dataset):
    """Replaces a sample whose image cannot be read or decoded (its loader is wrapped in
    ``ReadErrors``) by the next readable one, with a warning naming the file.

    The samples whose own read failed are counted in one integer shared with the data-loader
    workers: an epoch reads each sample once as itself, so the count since ``reset_count`` is the
    epoch's unreadable samples, in memory that does not grow with the data set."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.unreadable = multiprocessing.Value("q", 0)  # samples whose own read failed since reset_count

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        for offset in range(len(self.dataset)):
            candidate = (index + offset) % len(self.dataset)
            try:
                return self.dataset[candidate]
            except UnreadableImageError as error:
                if offset == 0:
                    with self.unreadable.get_lock():
                        self.unreadable.value += 1
                kind = "oversized" if isinstance(error.cause, ImageTooLargeError) else "unreadable"
                warnings.warn(f"skipping {kind} image {error.path}: {error.cause}", stacklevel=2)
                last = str(error)
        raise NoReadableImageError(f"none of the {len(self.dataset)} images can be read; the last: {last}")

    def count(self) -> int:
        return int(self.unreadable.value)

    def reset_count(self) -> None:
        with self.unreadable.get_lock():
            self.unreadable.value = 0


def wrapped(dataset: Optional[Dataset], kind: type) -> Optional[Dataset]:
    """The ``kind`` dataset in ``dataset``'s wrapper chain (each wrapper's ``.dataset``), if any."""
    while dataset is not None:
        if isinstance(dataset, kind):
            return dataset
        dataset = getattr(dataset, "dataset", None)
    return None


def count_skipped(dataset: Dataset) -> int:
    """Unreadable samples this rank met since the epoch began (``reset_skipped``), else 0."""
    found = wrapped(dataset, SkipUnreadable)
    return 0 if found is None else found.count()


def reset_skipped(dataset: Dataset) -> None:
    """Start counting a new epoch's unreadable samples."""
    found = wrapped(dataset, SkipUnreadable)
    if found is not None:
        found.reset_count()


def count_skipped_all_ranks(dataset: Dataset, device: torch.device) -> int:
    """The epoch's unreadable samples, summed over ranks (a collective; ranks read disjoint
    positions, so each sample is counted once)."""
    return int(all_reduce_sum(torch.tensor(count_skipped(dataset), device=device)))


# ----------------------------------------------------------------------------- folders


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS + ARRAY_EXTENSIONS)


def find_images(root: str) -> List[str]:
    """Image paths under ``root`` at any depth, sorted so the order is the same on every machine."""
    paths = []
    for folder, _, names in os.walk(root, followlinks=True):
        paths.extend(os.path.join(folder, name) for name in names if is_image_file(name))
    return sorted(paths)


def has_class_folders(root: str) -> bool:
    """True when some direct subfolder of ``root`` holds images: the ImageFolder layout."""
    with os.scandir(root) as entries:
        folders = [entry.path for entry in entries if entry.is_dir()]
    return any(find_images(folder) for folder in folders)


class ImageFiles(Dataset):
    """Every image under ``root`` (flat or nested, no class folders), each labelled 0."""

    def __init__(self, root: str, transform: Optional[Callable] = None, loader: Callable = load_rgb) -> None:
        self.root = str(root)
        self.transform = transform
        self.loader = loader
        self.samples: List[str] = find_images(self.root)
        if not self.samples:
            raise FileNotFoundError(
                f"no images ({', '.join(IMG_EXTENSIONS + ARRAY_EXTENSIONS)}) found under {self.root}"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[object, int]:
        image = self.loader(self.samples[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, 0


def build_image_folder(root: str, transform: Optional[Callable] = None, loader: Callable = load_rgb) -> Dataset:
    """torchvision's ``ImageFolder`` for ``root/<class>/...`` layouts, ``ImageFiles`` otherwise;
    ``loader`` reads one file (PIL's ``load_rgb`` or the tensor path's ``decode_rgb``)."""
    root = str(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    if has_class_folders(root):
        # allow_empty: an empty class folder is harmless for pretraining, which ignores labels
        folder = ImageFolder(root, transform=transform, loader=ReadErrors(loader), is_valid_file=is_image_file,
                             allow_empty=True)
        return SkipUnreadable(folder)
    return SkipUnreadable(ImageFiles(root, transform=transform, loader=ReadErrors(loader)))


def class_folders(root: str) -> List[str]:
    """The class names of a labelled folder, as ``ImageFolder`` finds them; a clear error when
    ``root`` is no folder of class subfolders."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} does not exist or is not a directory")
    if not has_class_folders(root):
        raise FileNotFoundError(f"{root} has no class subfolders with images (expected {root}/<class>/<image>)")
    return find_classes(root)[0]


def labelled_folder(root: str, transform: Callable, loader: Callable = load_rgb) -> ImageFolder:
    """An ``ImageFolder`` with one subfolder per class; a clear error for anything else."""
    class_folders(root)
    return ImageFolder(root, transform=transform, loader=ReadErrors(loader), is_valid_file=is_image_file)
