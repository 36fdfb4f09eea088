"""The tensor and device decoders against the PIL pipeline: the same pixels from lossless files,
the same crops, the same normalized values, and unreadable files handled as the PIL path handles them."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

from datasets import SeededSamples, build_pretraining_dataset
from image_data.augmentation import Crops, normalize_on_device
from image_data.device_decoder import batch_images, collate_encoded, decode_on_device, read_encoded
from image_data.files import decode_rgb


@pytest.mark.parametrize("mode, colour", [("RGB", (200, 30, 60)), ("L", 77), ("RGBA", (10, 20, 30, 128))])
def test_tensor_decoder_gives_the_pixels_of_a_lossless_file(tmp_path, mode, colour):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, (12, 20, len(Image.new(mode, (1, 1)).getbands())), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(values.squeeze(-1) if mode == "L" else values, mode=mode).save(path)
    decoded = decode_rgb(str(path))  # (3, H, W) uint8
    assert decoded.shape == (3, 12, 20) and decoded.dtype == torch.uint8
    expected = values[..., :3] if mode != "L" else np.repeat(values, 3, axis=-1)  # alpha dropped, grey repeated
    assert np.array_equal(decoded.permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("suffix", [".bmp", ".tif"])
def test_tensor_decoder_hands_formats_it_cannot_decode_to_pil(suffix, tmp_path):
    values = np.random.default_rng(1).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    path = tmp_path / f"image{suffix}"
    Image.fromarray(values, mode="RGB").save(path)
    decoded = decode_rgb(str(path))  # (3, H, W) uint8
    assert decoded.dtype == torch.uint8 and np.array_equal(decoded.permute(1, 2, 0).numpy(), values)


def test_tensor_decoder_reports_unreadable_files_as_os_errors(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(OSError, match="text.jpg"):
        decode_rgb(str(tmp_path / "text.jpg"))


def test_both_decoders_give_crops_that_normalize_to_the_same_values(tmp_path):
    for index in range(3):
        Image.new("RGB", (50, 40), (255, 255, 255)).save(tmp_path / f"white{index}.jpg", quality=95)
    for decoder in ("pil", "tensor"):
        dataset = build_pretraining_dataset("image_folder", str(tmp_path), Crops(32), decoder=decoder)
        image, _ = dataset[0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
        image = normalize_on_device(image[None], IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)[0]
        white = (1 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)  # (3,)
        assert torch.allclose(image.mean(dim=(1, 2)), white, atol=0.05)  # JPEG and resampling wiggle


def test_uint8_batches_are_normalized_as_the_formula_says():
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 2.0)
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)  # (B, 3, H, W)
    expected = torch.tensor([(0 - 0.5) / 0.5, (0.2 - 0.25) / 0.25, (1.0 - 0.0) / 2.0]).view(1, 3, 1, 1)
    normalized = normalize_on_device(pixels, mean, std)
    assert normalized.dtype == torch.float32
    torch.testing.assert_close(normalized, expected.expand(2, 3, 2, 2), atol=1e-6, rtol=0)
    # float batches (channel counts other than RGB, 16-bit images) arrive already scaled to [0, 1]
    torch.testing.assert_close(normalize_on_device(pixels.float() / 255, mean, std), expected.expand(2, 3, 2, 2),
                               atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="uint8 or \\[0, 1\\] float"):
        normalize_on_device(pixels.int(), mean, std)


def test_normalizing_on_the_device_gives_the_values_torchvision_gave_in_the_workers(device):
    """The PIL path used to end with ``ToTensor`` and ``Normalize`` in each worker: every one of
    the 256 pixel values must come out bit for bit as it did."""
    values = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(3, 16, 16)  # (3, H, W)
    picture = Image.fromarray(values.permute(1, 2, 0).numpy())
    in_worker = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    pixels = transforms.PILToTensor()(picture)[None].to(device)  # (1, 3, H, W) uint8
    on_device = normalize_on_device(pixels, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert on_device.device.type == device.type
    assert torch.equal(on_device[0].cpu(), in_worker(picture))


def write_varied_images(folder: Path) -> None:
    """Smooth RGB JPEGs larger and smaller than a 32-pixel crop, a greyscale and a CMYK JPEG, a PNG."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for index, size in enumerate([(120, 90), (90, 130), (40, 30), (24, 20)]):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))  # (h, w, 3)
        coarse.resize(size, Image.BICUBIC).save(folder / f"rgb{index}.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8)).save(folder / "grey.jpg")
    Image.new("CMYK", (60, 50), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(folder / "lossless.png")


def test_the_device_decoder_crops_as_the_pil_pipeline_does(tmp_path, device):
    """For the same seeded samples: the PIL pipeline's boxes and flips, and its pixels up to its
    8-bit rounding (within 1), where libjpeg-turbo decodes as PIL does (the CPU); nvJPEG decodes
    a little differently. In the step it runs under autocast, which must leave it alone."""
    write_varied_images(tmp_path / "images")
    built = {decoder: SeededSamples(build_pretraining_dataset("image_folder", str(tmp_path / "images"), Crops(32),
                                                              decoder=decoder), seed=3)
             for decoder in ("pil", "device")}
    keys = [(index, epoch) for epoch in range(3) for index in range(len(built["pil"]))]
    expected = torch.stack([built["pil"][key][0] for key in keys])  # (K, 3, 32, 32) uint8
    batch = collate_encoded([built["device"][key] for key in keys])
    assert set(batch.boxes[:, 4].tolist()) == {0, 1}  # both flipped and unflipped crops are compared
    assert {item.dim() for item in batch.data} == {1, 3}  # JPEG bytes, and the CMYK and PNG pixels
    crops = batch_images(batch, device)
    assert crops.dtype == torch.uint8 and crops.shape == expected.shape and crops.device.type == device.type
    difference = (crops.cpu().int() - expected.int()).abs()
    if device.type == "cpu":
        assert difference.max() <= 1
    else:
        assert difference.float().mean() < 1
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert torch.equal(batch_images(batch, device), crops)


def test_a_jpeg_no_decoder_reads_gives_its_place_in_the_batch_to_a_readable_one(tmp_path):
    """A file whose header and end look whole but whose data nvJPEG/libjpeg and PIL all refuse
    (a marker inside the scan) reaches the step; it must not stop the run."""
    write_varied_images(tmp_path / "images")
    whole = (tmp_path / "images" / "rgb0.jpg").read_bytes()
    (tmp_path / "images" / "rgb1.jpg").write_bytes(whole[:400] + b"\xff\xc4\x00\x02" + whole[404:])
    samples = SeededSamples(build_pretraining_dataset("image_folder", str(tmp_path / "images"), Crops(32),
                                                      decoder="device"), seed=0)
    names = [Path(path).name for path in samples.dataset.dataset.samples]  # the flat folder, sorted
    batch = collate_encoded([samples[(names.index(name), 0)] for name in ("rgb0.jpg", "rgb1.jpg", "rgb2.jpg")])
    with pytest.warns(UserWarning) as caught:
        crops = batch_images(batch, torch.device("cpu"))
    messages = " ".join(str(warning.message) for warning in caught)
    assert "decoding its files with PIL" in messages and "skipping an unreadable JPEG" in messages
    alone = batch_images(collate_encoded([samples[(names.index("rgb0.jpg"), 0)]]), torch.device("cpu"))
    assert torch.equal(crops[1], alone[0]) and torch.equal(crops[0], alone[0])  # rgb0's crop twice
    assert not torch.equal(crops[2], alone[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decoding_never_writes_memory_that_queued_kernels_still_read(tmp_path):
    """pytorch/vision#9606: torchvision's CUDA decoder can be handed memory freed on the current
    stream while kernels queued there still have to read it, and overwrite it first. Here 64
    blocks of the decoded images' size are freed behind queued sums; none of the sums may change."""
    write_varied_images(tmp_path / "images")
    jpeg = read_encoded(str(tmp_path / "images" / "rgb0.jpg")).data  # 120 x 90 pixels
    device = torch.device("cuda")
    held = [torch.full((3, 90, 120), 7, dtype=torch.uint8, device=device) for _ in range(64)]
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # keeps the stream busy for tens of milliseconds
    sums = [block.sum(dtype=torch.int64) for block in held]  # queued behind the sleep
    del held  # freed on the stream while the sums have yet to read them
    images = decode_on_device([jpeg] * 64, device)
    torch.cuda.synchronize()
    assert [int(total) for total in sums] == [7 * 3 * 90 * 120] * 64
    assert all(image.shape == (3, 90, 120) for image in images)


def test_16_bit_files_reach_the_tensor_crop_as_their_top_8_bits(tmp_path):
    values = np.full((40, 50), 0x8A3F, dtype=np.uint16)  # 8-bit value 0x8A = 138
    Image.fromarray(values).save(tmp_path / "deep.png")
    image, _ = build_pretraining_dataset("image_folder", str(tmp_path), Crops(32), decoder="tensor")[0]
    assert image.dtype == torch.uint8 and bool((image == 0x8A).all())