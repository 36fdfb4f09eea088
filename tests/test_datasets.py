"""Datasets: the synthetic set, image folders of every pixel format, per-sample seeding and unreadable files
(the decoders that read them: ``test_decoders.py``)."""
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import ImageFolder

from image_data.augmentation import Crops
from datasets import SeededSamples, build_pretraining_dataset
from image_data.epoch_order import EpochSampler, PermutationOrder
from image_data.files import ImageFiles, build_image_folder, count_skipped, load_image, load_rgb
from image_data.synthetic import SyntheticShapes


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def save_rgb(path: Path, size=(20, 12), colour=(200, 30, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# ----------------------------------------------------------------------------- synthetic shapes

def test_synthetic_is_deterministic_per_index_and_varies_across_indices():
    first, second = SyntheticShapes(20, image_size=32), SyntheticShapes(20, image_size=32)
    assert np.array_equal(pixels(first[7][0]), pixels(second[7][0]))
    assert not np.array_equal(pixels(first[7][0]), pixels(first[17][0]))  # same class, new draw
    assert not np.array_equal(pixels(first[7][0]), pixels(SyntheticShapes(20, image_size=32, seed=1)[7][0]))


@pytest.mark.parametrize("size", [32, 96])
def test_synthetic_images_are_rgb_at_the_requested_size(size):
    image, label = SyntheticShapes(3, image_size=size)[2]
    assert image.mode == "RGB" and image.size == (size, size)
    assert isinstance(label, int)


def test_synthetic_labels_are_balanced_and_named():
    dataset = SyntheticShapes(50, image_size=16, num_classes=5)
    assert np.bincount(dataset.targets).tolist() == [10] * 5
    assert [dataset[i][1] for i in range(len(dataset))] == dataset.targets
    assert len(set(dataset.classes)) == 5


@pytest.mark.parametrize("num_classes", [1, 1000])
def test_synthetic_rejects_unsupported_class_counts(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticShapes(10, num_classes=num_classes)


def spectrum_features(dataset: SyntheticShapes):
    """Log magnitude spectrum of the standardised grey image: blind to position (a shift only
    changes the phase) and to which colour is foreground (a sign flip keeps the magnitude)."""
    features, labels = [], []
    for image, label in dataset:
        grey = pixels(image.convert("L"))
        grey = (grey - grey.mean()) / (grey.std() + 1e-6)
        features.append(np.log1p(np.abs(np.fft.rfft2(grey))).ravel())
        labels.append(label)
    return np.stack(features), np.array(labels)


def mean_colour_features(dataset: SyntheticShapes):
    return np.stack([pixels(image).mean((0, 1)) for image, _ in dataset]), np.array(dataset.targets)


def nearest_centroid_accuracy(featurize, num_classes: int = 10) -> float:
    train_x, train_y = featurize(SyntheticShapes(40 * num_classes, image_size=32, num_classes=num_classes, seed=1))
    test_x, test_y = featurize(SyntheticShapes(20 * num_classes, image_size=32, num_classes=num_classes, seed=2))
    centroids = np.stack([train_x[train_y == c].mean(0) for c in range(num_classes)])  # (C, F)
    distances = ((test_x[:, None] - centroids[None]) ** 2).sum(-1)  # (n, C)
    return float((distances.argmin(1) == test_y).mean())


def test_synthetic_classes_differ_in_shape_not_in_colour():
    # chance is 0.1: shape features separate the kinds, the average colour does not
    assert nearest_centroid_accuracy(spectrum_features) > 0.4
    assert nearest_centroid_accuracy(mean_colour_features) < 0.2


# ----------------------------------------------------------------------------- image files

def write_every_mode(root: Path) -> None:
    """One small image per awkward pixel format, in nested folders, plus a non-image file."""
    root.mkdir(parents=True, exist_ok=True)
    Image.new("L", (10, 8), 90).save(root / "grey.png")
    palette = Image.new("P", (10, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(root / "palette.png", transparency=b"\x00\x80")  # tRNS bytes: the warning case
    Image.new("RGBA", (10, 8), (10, 20, 30, 40)).save(root / "alpha.png")
    (root / "a" / "b").mkdir(parents=True)
    Image.new("CMYK", (10, 8), (0, 255, 255, 0)).save(root / "a" / "cmyk.JPG")  # red, upper-case suffix
    ramp = np.linspace(0, 65535, 80).astype(np.uint16).reshape(8, 10)
    Image.fromarray(ramp).save(root / "a" / "b" / "deep.png")  # 16-bit greyscale
    (root / "a" / "notes.txt").write_text("not an image")


def test_image_files_finds_nested_images_in_sorted_order(tmp_path):
    write_every_mode(tmp_path)
    dataset = ImageFiles(str(tmp_path))
    names = [Path(path).relative_to(tmp_path).as_posix() for path in dataset.samples]
    assert names == ["a/b/deep.png", "a/cmyk.JPG", "alpha.png", "grey.png", "palette.png"]
    assert all(label == 0 for _, label in dataset)


def test_every_pixel_format_loads_as_8_bit_rgb(tmp_path):
    write_every_mode(tmp_path)
    with Image.open(tmp_path / "a" / "b" / "deep.png") as deep:
        assert deep.mode.startswith("I")  # really 16-bit on disk
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's "palette images with transparency" warning
        dataset = ImageFiles(str(tmp_path))
        images = {Path(path).name: image for path, (image, _) in zip(dataset.samples, dataset)}
    for image in images.values():
        assert image.mode == "RGB" and image.size == (10, 8)
    assert pixels(images["grey.png"])[0, 0].tolist() == [90, 90, 90]
    assert pixels(images["palette.png"])[0, 0].tolist() == [255, 0, 0]
    assert pixels(images["alpha.png"])[0, 0].tolist() == [10, 20, 30]
    red, green, blue = pixels(images["cmyk.JPG"])[4, 5]
    assert red > 200 and green < 60 and blue < 60
    ramp = pixels(images["deep.png"])[..., 0].ravel()
    assert ramp[0] == 0 and ramp[-1] == 255 and ramp[40] == pytest.approx(128, abs=2)  # scaled, not clipped


def test_load_rgb_keeps_rgb_pixels_unchanged(tmp_path):
    image = load_rgb(str(save_rgb(tmp_path / "x.png")))
    assert image.mode == "RGB" and pixels(image)[0, 0].tolist() == [200, 30, 60]


def test_build_image_folder_uses_class_folders_when_present(tmp_path):
    save_rgb(tmp_path / "cat" / "1.png")
    save_rgb(tmp_path / "cat" / "2.jpeg")
    save_rgb(tmp_path / "dog" / "deeper" / "3.PNG")
    dataset = build_image_folder(str(tmp_path), transform=None)
    assert isinstance(dataset.dataset, ImageFolder)
    assert dataset.dataset.classes == ["cat", "dog"] and len(dataset) == 3
    image, label = dataset[2]
    assert image.mode == "RGB" and label == 1


def test_build_image_folder_reads_a_flat_folder_as_unlabelled(tmp_path):
    for name in ("b.png", "a.jpg", "c.webp"):
        save_rgb(tmp_path / name)
    dataset = build_image_folder(str(tmp_path), transform=None)
    assert isinstance(dataset.dataset, ImageFiles) and len(dataset) == 3


def test_empty_or_missing_folders_raise_file_not_found(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="empty"):
        build_image_folder(str(tmp_path / "empty"), transform=None)
    with pytest.raises(FileNotFoundError, match="missing"):
        build_image_folder(str(tmp_path / "missing"), transform=None)


# ----------------------------------------------------------------------------- pretraining

def check_pretraining_sample(image: torch.Tensor) -> None:
    assert image.shape == (3, 224, 224) and image.dtype == torch.uint8


def test_synthetic_pretraining_samples_are_uint8_crops():
    dataset = build_pretraining_dataset("synthetic", None, Crops(224), num_samples=2)
    assert len(dataset) == 2
    check_pretraining_sample(dataset[1][0])


def test_image_folder_pretraining_samples_are_resized_and_limited(tmp_path):
    for index in range(5):
        save_rgb(tmp_path / f"{index}.png", size=(40, 30))
    dataset = build_pretraining_dataset("image_folder", str(tmp_path), Crops(224), num_samples=3)
    assert len(dataset) == 3
    check_pretraining_sample(dataset[2][0])
    everything = build_pretraining_dataset("image_folder", str(tmp_path), Crops(224), num_samples=50)
    assert len(everything) == 5


def test_pretraining_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="synthetic"):
        build_pretraining_dataset("imagenet", None, Crops(32))
    with pytest.raises(ValueError, match="data_path"):
        build_pretraining_dataset("image_folder", None, Crops(32))


def epoch_crops(loader: DataLoader, sampler: EpochSampler, epoch: int) -> torch.Tensor:
    sampler.set_epoch(epoch)
    return torch.cat([imgs for imgs, _ in loader])  # (samples, 3, H, W)


def test_samples_depend_on_epoch_and_index_only_not_on_workers():
    """The random crops and flips: the same for a sample in any worker, new each epoch."""
    dataset = SeededSamples(build_pretraining_dataset("synthetic", None, Crops(16), num_samples=8), seed=3)
    sampler = EpochSampler(PermutationOrder(len(dataset), seed=3), num_replicas=1, rank=0)
    in_process = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=0)
    in_workers = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=2)
    first = epoch_crops(in_process, sampler, 0)
    assert first.shape == (8, 3, 16, 16)
    assert torch.equal(first, epoch_crops(in_workers, sampler, 0))  # same crops in any worker
    assert not torch.equal(first, epoch_crops(in_process, sampler, 1))  # new crops next epoch
    assert len({crop.numpy().tobytes() for crop in first}) > 1  # and different across samples


def test_drawing_a_sample_leaves_the_training_rngs_untouched():
    dataset = SeededSamples(build_pretraining_dataset("synthetic", None, Crops(32), num_samples=2), seed=0)
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    expected = torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random()
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    image_a, _ = dataset[(1, 0)]
    assert (torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random()) == expected
    image_b, _ = dataset[(1, 0)]
    assert torch.equal(image_a, image_b)


def test_sampler_skips_what_a_resumed_epoch_has_already_seen():
    sampler = EpochSampler(PermutationOrder(10, seed=0), num_replicas=2, rank=1)
    sampler.set_epoch(4)
    full = list(sampler)
    assert len(full) == 5 and all(epoch == 4 for _, epoch in full)
    sampler.set_epoch(4, samples_done=3 * 2)  # 3 samples on each of the 2 ranks
    assert list(sampler) == full[3:]
    assert list(sampler) == full  # the skip applies to one pass only


def test_sampler_partitions_as_torchs_distributed_sampler_does():
    """A fresh epoch is ``DistributedSampler(shuffle=True, drop_last=True)``'s, rank by rank."""
    for world in (1, 2, 3):
        for rank in range(world):
            ours, torchs = EpochSampler(PermutationOrder(11, seed=5), world, rank), DistributedSampler(
                range(11), num_replicas=world, rank=rank, shuffle=True, seed=5, drop_last=True)
            ours.set_epoch(2)
            torchs.set_epoch(2)
            assert [index for index, _ in ours] == list(torchs) and len(ours) == len(torchs)


def test_an_epoch_resumed_on_another_world_size_sees_every_position_once():
    """2 processes take 2 steps of 3 images (positions 0-11 of 30), then 3 processes continue with
    steps of 2: together every position of the epoch's order is trained exactly once."""
    def steps(world: int, batch: int, samples_done: int):
        ranks = []
        for rank in range(world):
            sampler = EpochSampler(PermutationOrder(30, seed=1), world, rank)
            sampler.set_epoch(0, samples_done)
            keys = [index for index, _ in sampler]
            ranks.append([keys[i:i + batch] for i in range(0, len(keys) - batch + 1, batch)])  # drop_last
        return [sum((rank_batches[step] for rank_batches in ranks), []) for step in range(len(ranks[0]))]

    before = steps(world=2, batch=3, samples_done=0)[:2]  # then the run stops
    after = steps(world=3, batch=2, samples_done=12)
    seen = sum(before + after, [])
    assert sorted(seen) == list(range(30))


def test_unreadable_files_are_skipped_counted_and_named(tmp_path):
    save_rgb(tmp_path / "a_good.png")
    (tmp_path / "b_empty.jpg").write_bytes(b"")
    (tmp_path / "c_text.jpg").write_text("not an image")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "d_full.jpg", quality=90)
    (tmp_path / "e_truncated.jpg").write_bytes((tmp_path / "d_full.jpg").read_bytes()[:300])
    dataset = build_image_folder(str(tmp_path))
    with pytest.warns(UserWarning) as caught:
        images = [dataset[index][0] for index in range(len(dataset))]
    assert all(isinstance(image, Image.Image) for image in images)
    assert count_skipped(dataset) == 3
    named = " ".join(str(w.message) for w in caught)
    assert all(name in named for name in ("b_empty.jpg", "c_text.jpg", "e_truncated.jpg"))


def test_a_npy_image_holding_nan_is_skipped_counted_and_named(tmp_path):
    np.save(tmp_path / "a_good.npy", np.full((2, 8, 8), 0.5, dtype=np.float32))
    bad = np.full((2, 8, 8), 0.5, dtype=np.float32)
    bad[1, 3, 3], bad[0, 0, 0] = np.nan, np.inf
    np.save(tmp_path / "b_nan.npy", bad)
    dataset = build_image_folder(str(tmp_path), loader=lambda path: load_image(path, in_chans=2))
    with pytest.warns(UserWarning, match=r"b_nan.npy: 2 of its 128 values are NaN or infinite"):
        images = [dataset[index][0] for index in range(len(dataset))]
    assert all(bool(torch.isfinite(image).all()) for image in images) and count_skipped(dataset) == 1


def test_an_error_of_a_transform_is_no_unreadable_file(tmp_path):
    """Only reading and decoding are skipped: a bug in a transform must stop the run, not be
    retried on every other file."""
    for name in ("a.png", "b.png"):
        save_rgb(tmp_path / name)

    def broken(image):
        raise ValueError("a bug in the transform")

    dataset = build_image_folder(str(tmp_path), transform=broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping" warning either
        with pytest.raises(ValueError, match="a bug in the transform"):
            dataset[0]
    assert count_skipped(dataset) == 0
