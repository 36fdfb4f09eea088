"""The device decoder (``--decoder device``), for GPUs the data-loader workers cannot feed: the
workers only read each JPEG's bytes and draw its crop box (the PIL pipeline's crop, from the same
seeded draws), and the training device decodes the batch (nvJPEG on CUDA) and crops and resizes it
as PIL would, within 1 level. Files nvJPEG cannot take are decoded in the workers instead.
"""
import functools
import io
import warnings
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from image_data.augmentation import Crops, pretraining_augmentation
from image_data.files import (
    DEFAULT_MAX_IMAGE_PIXELS,
    UNREADABLE,
    ImageSource,
    check_image_size,
    load_rgb,
    source_bytes,
    source_name,
)
from image_data.geometry import to_grid

JPEG_END = (0xFF, 0xD9)  # the end-of-image marker that a complete JPEG file ends with


class EncodedImage(NamedTuple):
    """A file as a device-decoder worker hands it over, with its size for the crop."""

    data: torch.Tensor  # (n,) uint8 JPEG bytes, or (3, H, W) uint8 pixels where nvJPEG is no use
    height: int
    width: int


def read_encoded(source: ImageSource, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> EncodedImage:
    """The bytes and size of a complete RGB or greyscale JPEG (a file, or a shard's member) of at
    most ``max_pixels`` pixels, read from its header without decoding it. Other files (PNG, CMYK,
    16-bit, truncated JPEGs: what nvJPEG cannot take or PIL must judge) are decoded here by
    ``load_rgb``, so an unreadable one raises in the worker and ``SkipUnreadable`` skips it as for
    the other decoders."""
    data = torch.from_numpy(source_bytes(source))  # (n,) bytes, the file read once
    try:
        image = Image.open(io.BytesIO(data.numpy()))
    except UNREADABLE as error:
        raise OSError(f"cannot read {source_name(source)}: {error}") from error
    with image:
        check_image_size(image, max_pixels)
        if image.format == "JPEG" and image.mode in ("RGB", "L") and tuple(data[-2:].tolist()) == JPEG_END:
            return EncodedImage(data, image.height, image.width)
    pixels = transforms.functional.pil_to_tensor(load_rgb(io.BytesIO(data.numpy()), max_pixels))  # (3, H, W) uint8
    return EncodedImage(pixels, pixels.shape[1], pixels.shape[2])


class RandomCropBox:
    """``pretraining_augmentation``'s crop and flip, drawn in the worker and applied on the device
    by ``crop_on_device``. The draws are those of ``RandomResizedCrop`` then
    ``RandomHorizontalFlip`` from torch's RNG, so a seeded sample gets the box and flip the PIL
    pipeline would give it."""

    def __init__(self, crops: Crops) -> None:
        self.output = to_grid(crops.size)  # (H, W)
        self.crop, self.flip = pretraining_augmentation(crops)

    def __call__(self, image: EncodedImage) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (data, (7,) int64 box: top, left, height, width, flip, output height, output width)."""
        size_only = torch.empty(1, 1, 1).expand(3, image.height, image.width)  # get_params reads the size alone
        top, left, height, width = self.crop.get_params(size_only, self.crop.scale, self.crop.ratio)
        flip = int(torch.rand(1) < self.flip.p)
        return image.data, torch.tensor([top, left, height, width, flip, *self.output])


class EncodedBatch(NamedTuple):
    """A batch of ``RandomCropBox`` samples; the files differ in size, so their data stay a list."""

    data: List[torch.Tensor]  # B x ((n,) JPEG bytes or (3, h, w) pixels), uint8, on the host
    boxes: torch.Tensor  # (B, 7) int64: top, left, height, width, flip, output height and width
    labels: torch.Tensor  # (B,)


def collate_encoded(samples: Sequence[Tuple[Tuple[torch.Tensor, torch.Tensor], int]]) -> EncodedBatch:
    """The loader's ``collate_fn`` for the device decoder."""
    return EncodedBatch(
        [data for (data, _), _ in samples],
        torch.stack([box for (_, box), _ in samples]),  # (B, 7)
        torch.tensor([label for _, label in samples]),
    )


def decode_on_device(data: Sequence[torch.Tensor], device: torch.device) -> List[Optional[torch.Tensor]]:
    """B x (3, h, w) uint8 images on ``device``: the JPEG bytes decoded there in one call (nvJPEG
    on CUDA, libjpeg-turbo on the CPU), the pixels the workers decoded copied over; None for a
    file that no decoder can read."""
    jpegs = [index for index, item in enumerate(data) if item.dim() == 1]
    images: List[Optional[torch.Tensor]] = list(data)
    for index, image in zip(jpegs, decode_jpegs([data[index] for index in jpegs], device)):
        images[index] = image
    return [None if image is None else image.to(device, non_blocking=True) for image in images]


def decode_jpegs(encoded: List[torch.Tensor], device: torch.device) -> List[Optional[torch.Tensor]]:
    """``decode_jpeg_batch`` on a batch. It returns nothing when one file fails, so such a batch
    is decoded file by file with PIL, which judges each file as the PIL path would."""
    if not encoded:
        return []
    try:
        return decode_jpeg_batch(encoded, device)
    except RuntimeError as error:
        warnings.warn(f"decoding a batch on {device} failed ({error}); decoding its files with PIL", stacklevel=2)
    return [pil_decode(item) for item in encoded]


@functools.lru_cache(maxsize=None)
def decode_stream(device: torch.device) -> "torch.cuda.Stream":
    """A CUDA stream that only ever decodes, one per device."""
    return torch.cuda.Stream(device)


JpegBatchDecoder = Callable[[List[torch.Tensor], torch.device], List[torch.Tensor]]


@functools.lru_cache(maxsize=None)
def jpeg_batch_decoder() -> JpegBatchDecoder:
    """torchcodec's ``decode_jpeg`` where it is installed (torchvision 0.29 deprecates its own),
    else ``torchvision.io``'s: both decode a list of byte tensors to RGB, as one nvJPEG batch on
    CUDA. Chosen once per process, as ``file_decoder`` is."""
    try:
        from torchcodec.decoders import decode_jpeg
    except (ImportError, OSError, RuntimeError):  # not installed, or its libraries fail to load
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as torchvision_decode_jpeg

        return lambda encoded, device: torchvision_decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    return lambda encoded, device: decode_jpeg(encoded, mode="RGB", device=device)


def decode_jpeg_batch(encoded: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """B x (3, h, w) uint8 from ``jpeg_batch_decoder``. On CUDA torchvision's decoder allocates
    its outputs on the current stream but writes them from a stream of its own that does not
    wait for it (pytorch/vision#9606): on the training stream it could be handed memory that
    kernels of the previous step, still queued, have yet to read. So it runs with
    ``decode_stream`` current, whose memory nothing queued can still be using; the training
    stream then waits for it, and the images are marked as used there, so their memory is not
    reused too early."""
    decode = jpeg_batch_decoder()
    if device.type != "cuda":
        return decode(encoded, device)
    stream = decode_stream(device)
    with torch.cuda.stream(stream):
        images = decode(encoded, device)
    training_stream = torch.cuda.current_stream(device)
    training_stream.wait_stream(stream)
    for image in images:
        image.record_stream(training_stream)
    return images


def pil_decode(encoded: torch.Tensor) -> Optional[torch.Tensor]:
    """(n,) JPEG bytes -> (3, h, w) uint8 by PIL, or None, with a warning, for an unreadable file."""
    try:
        return transforms.functional.pil_to_tensor(load_rgb(io.BytesIO(encoded.numpy())))
    except UNREADABLE as error:
        warnings.warn(f"skipping an unreadable JPEG ({error}); another image of its batch takes its place",
                      stacklevel=2)
        return None


def pil_bicubic(crop: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(1, 3, h, w) uint8 -> (1, 3, H, W) float holding 8-bit values, as PIL's bicubic resize
    computes them: antialiased (the filter widened by the reduction), one pass across, rounded and
    clipped to 8 bits, then one pass down. Without the rounding in between, bicubic overshoot on
    sharp detail ends up to 13 levels from PIL's pixels; with it, within 1."""
    height, width = size
    across = F.interpolate(crop.float(), size=(crop.shape[2], width), mode="bicubic", antialias=True)  # (1, 3, h, W)
    across = across.round_().clamp_(0, 255)
    return F.interpolate(across, size=(height, width), mode="bicubic", antialias=True).round_().clamp_(0, 255)


def crop_on_device(batch: EncodedBatch, device: torch.device) -> torch.Tensor:
    """(B, 3, H, W) uint8: each image decoded on ``device``, cropped to its box, resized as PIL
    resizes (``pil_bicubic``) and flipped where its box says, as the PIL pipeline does in the
    workers. An unreadable file's place goes to the batch's first readable image, with its box."""
    images = decode_on_device(batch.data, device)
    readable = [index for index, image in enumerate(images) if image is not None]
    if not readable:
        raise OSError("no image of this batch can be decoded; run with --decoder pil to skip unreadable files")
    sources = [index if images[index] is not None else readable[0] for index in range(len(images))]
    boxes = batch.boxes[sources]  # (B, 7)
    crops = [
        pil_bicubic(images[index][None, :, top:top + height, left:left + width], (out_h, out_w))  # (1, 3, H, W)
        for index, (top, left, height, width, _, out_h, out_w) in zip(sources, boxes.tolist())  # on the host
    ]
    resized = torch.cat(crops).to(torch.uint8)  # (B, 3, H, W)
    flip = boxes[:, 4].to(device, non_blocking=True).bool().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return torch.where(flip, resized.flip(-1), resized)


def batch_images(batch: Union[EncodedBatch, Sequence[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """A training batch's (B, 3, H, W) uint8 images on ``device``: decoded and cropped there for
    the device decoder, copied for the others."""
    if isinstance(batch, EncodedBatch):
        return crop_on_device(batch, device)
    return batch[0].to(device, non_blocking=True)
