"""WebDataset tar shards: naming them, indexing them (checked against ``tarfile``'s own reading),
decoding their members as files are decoded, the windowed order of an epoch (a permutation, one
window of shards at a time, flat in N), bad shards as usage errors, the converter, and every stage
trained on shards, resumed on another number of processes with every sample once."""
import io
import itertools
import json
import signal
import tarfile
import time
import tracemalloc
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

import make_shards
import run_class_finetuning
import run_knn_eval
import run_linear_probe
import run_mae_pretraining
import utils
from datasets import build_classification_dataset, shard_images
from helpers import PRETRAIN, TINY_MAE, TINY_VIT, finish, recording, start, torchrun, trained_keys, wait_for_step
from image_data.device_decoder import read_encoded
from image_data.epoch_order import EpochSampler, ShardWindowOrder
from image_data.files import MemberBytes, count_skipped, decode_rgb, load_image, reset_skipped
from image_data.shard_index import INDEX_SUFFIX, build_index, fallback_index_path
from image_data.shard_names import expand_braces, shard_paths
from image_data.shards import ShardImages, catalog_shards
from training.resume import order_change



def jpeg_bytes(color, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, members: Dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            add(tar, name, data)
    return path


def image_folder(root: Path, per_class: int = 8) -> Path:
    """Two classes of solid colours, ``per_class`` JPEGs each."""
    for name, color in (("blue", (20, 30, 220)), ("red", (220, 30, 20))):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            Image.new("RGB", (36 + index, 32), color).save(root / name / f"{name}.{index}.jpg", quality=90)
    return root


def convert(source: Path, out: Path, per_shard: int, prefix: str = "shard") -> dict:
    argv = ["--data_path", str(source), "--output_dir", str(out), "--samples_per_shard", str(per_shard),
            "--prefix", prefix]
    return make_shards.main(make_shards.get_args_parser().parse_args(argv))


# ----------------------------------------------------------------------------- naming and indexing


def test_brace_patterns_expand_as_bash_does():
    assert expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert expand_braces("{x,y}-{0..1}.tar") == ["x-0.tar", "x-1.tar", "y-0.tar", "y-1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(utils.UsageError, match="neither a range"):
        expand_braces("a-{oops}.tar")


def test_shards_are_named_by_a_pattern_a_folder_or_a_list(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    names = [write_tar(folder / f"s-{index:02d}.tar", {f"k{index}.jpg": jpeg_bytes((index, 0, 0))})
             for index in range(3)]
    (tmp_path / "list.txt").write_text("# training shards\nshards/s-00.tar\n\n" + f"{names[1]}\nshards/s-02.tar\n")
    expected = [str(name) for name in names]
    assert shard_paths(str(folder / "s-{00..02}.tar")) == expected
    assert shard_paths(str(folder)) == expected
    assert shard_paths(str(tmp_path / "list.txt")) == expected
    with pytest.raises(utils.UsageError, match=r"shard .*s-03.tar \(of .*\) does not exist"):
        shard_paths(str(folder / "s-{00..03}.tar"))


def test_the_index_finds_what_tarfile_extracts_in_hugging_face_s_layout(tmp_path):
    """Members KEY.jpg, KEY.cls, KEY.json grouped by key, as the Hub's ImageNet -wds shards are;
    keys with folders and dots in the folder, upper-case extensions, a sample with two images
    (the jpg is taken, as WebDataset's decoders prefer it), and a sample with no image."""
    members = {
        "n01440764_10026.jpg": jpeg_bytes((1, 2, 3)), "n01440764_10026.cls": b"0",
        "n01440764_10026.json": b'{"filename": "n01440764_10026.JPEG"}',
        "train.v2/n015_77.JPEG": jpeg_bytes((9, 9, 9)), "train.v2/n015_77.cls": b" 999\n",
        "both.png": b"a png that is not taken", "both.jpg": jpeg_bytes((5, 5, 5)), "both.cls": b"7",
        "only_meta.json": b"{}",
    }
    shard = write_tar(tmp_path / "imagenet1k-train-0000.tar", members)
    index = build_index(str(shard))
    with tarfile.open(shard) as tar:
        extracted = {member.name: tar.extractfile(member).read() for member in tar if member.isfile()}
    with open(shard, "rb") as handle:
        read = []
        for offset, size in zip(index.offsets.tolist(), index.sizes.tolist()):
            handle.seek(offset)
            read.append(handle.read(size))
    assert [name.decode() for name in index.names] == ["n01440764_10026.jpg", "train.v2/n015_77.JPEG", "both.jpg"]
    assert read == [extracted[name.decode()] for name in index.names]
    assert index.labels.tolist() == [0, 999, 7]


def test_every_decoder_reads_a_member_as_it_reads_the_same_file(tmp_path):
    path = tmp_path / "photo.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=85)
    member = MemberBytes("s.tar:photo.jpg", path.read_bytes())
    assert np.array_equal(np.asarray(load_image(str(path))), np.asarray(load_image(member)))
    assert torch.equal(decode_rgb(str(path)), decode_rgb(member))
    assert torch.equal(read_encoded(str(path)).data, read_encoded(member).data)
    array = np.random.default_rng(1).random((2, 6, 5)).astype(np.float32)
    np.save(tmp_path / "two.npy", array)
    two = MemberBytes("s.tar:two.npy", (tmp_path / "two.npy").read_bytes())
    assert torch.equal(load_image(two, in_chans=2), torch.from_numpy(array))


def test_a_changed_shard_is_indexed_again(tmp_path):
    shard = write_tar(tmp_path / "a.tar", {"x.jpg": jpeg_bytes((1, 1, 1))})
    assert catalog_shards(str(shard), None).counts.tolist() == [1]
    assert (tmp_path / f"a.tar{INDEX_SUFFIX}").is_file()
    write_tar(shard, {"x.jpg": jpeg_bytes((1, 1, 1)), "y.jpg": jpeg_bytes((2, 2, 2)), "y.cls": b"3"})
    catalog = catalog_shards(str(shard), None)
    assert catalog.counts.tolist() == [2] and catalog.max_label == 3 and catalog.unlabelled == 1


def test_where_a_shard_s_folder_cannot_take_its_index_it_goes_under_the_output_folder(tmp_path):
    """A directory in the index's place makes the write fail as a read-only folder does, for root too;
    and a bad shard among them leaves the output folder untouched."""
    shards = [write_tar(tmp_path / f"s{index}.tar", {f"k{index}.jpg": jpeg_bytes((index, 1, 1))}) for index in range(2)]
    for shard in shards:
        Path(f"{shard}{INDEX_SUFFIX}").mkdir()
    spec, out = str(tmp_path / "s{0..1}.tar"), tmp_path / "out"
    (tmp_path / "s2.tar").write_bytes(b"")
    with pytest.raises(utils.UsageError, match=r"shard .*s2.tar is empty"):
        catalog_shards(str(tmp_path / "s{0..2}.tar"), str(out))
    assert not out.exists()
    catalog = catalog_shards(spec, str(out))
    assert catalog.index_paths == tuple(fallback_index_path(str(shard), str(out)) for shard in shards)
    assert all(Path(path).is_file() for path in catalog.index_paths)
    with pytest.raises(utils.UsageError, match="needs --output_dir"):
        catalog_shards(spec, None)


@pytest.mark.parametrize("fault", ["missing", "empty", "text", "truncated", "no_image"])
def test_a_bad_shard_is_one_error_line_and_exit_2_before_anything_is_written(tmp_path, capsys, fault):
    good = write_tar(tmp_path / "s0.tar", {f"k{index}.jpg": jpeg_bytes((index, 2, 3)) for index in range(4)})
    bad = tmp_path / "s1.tar"
    if fault == "empty":
        bad.write_bytes(b"")
    elif fault == "text":
        bad.write_text("not a tar " * 100)
    elif fault == "truncated":
        bad.write_bytes(good.read_bytes()[:3000])
    elif fault == "no_image":
        write_tar(bad, {"k.json": b"{}"})
    out = tmp_path / "out"
    argv = [*TINY_MAE, "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0", "--data_path", str(tmp_path / "s{0..1}.tar"),
            "--output_dir", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(run_mae_pretraining.main, run_mae_pretraining.get_args_parser().parse_args(argv))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "s1.tar" in lines[0], lines
    assert not out.exists()


# ----------------------------------------------------------------------------- the order of an epoch


def test_an_epoch_is_a_permutation_that_reads_one_window_of_shards_at_a_time():
    counts = np.array([5, 7, 3, 9, 1, 6, 0, 4, 8])
    starts = np.concatenate([[0], np.cumsum(counts)])
    order = ShardWindowOrder(counts, window=3, seed=0)
    epochs = [order.indices(epoch, np.arange(order.num_samples)) for epoch in range(3)]
    for indices in epochs:
        assert sorted(indices.tolist()) == list(range(order.num_samples))
        shards = np.searchsorted(starts, indices, side="right") - 1  # the shard each position reads
        first = {shard: np.flatnonzero(shards == shard)[0] for shard in set(shards.tolist())}
        last = {shard: np.flatnonzero(shards == shard)[-1] for shard in set(shards.tolist())}
        open_at = [sum(first[shard] <= position <= last[shard] for shard in first) for position in range(len(shards))]
        assert max(open_at) <= 3  # a window's shards are read together, and each shard in one stretch
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], ShardWindowOrder(counts, 3, seed=1).indices(0, np.arange(order.num_samples)))


def test_positions_of_an_epoch_of_a_billion_samples_take_flat_memory_and_time():
    """100,000 shards of 10,000: rank 5 of 8 resumes at position 7e8 and draws 20,000 keys."""
    order = ShardWindowOrder(np.full(100_000, 10_000), window=16, seed=0)
    sampler = EpochSampler(order, num_replicas=8, rank=5)
    sampler.set_epoch(3, samples_done=700_000_000)
    tracemalloc.start()
    began = time.perf_counter()
    keys = list(itertools.islice(iter(sampler), 20_000))
    elapsed = time.perf_counter() - began
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(sampler) == 125_000_000 and order.num_samples == 10**9
    assert elapsed < 5 and peak < 24 * 2**20, (elapsed, peak)  # a permutation of N would be 8 GB
    indices = [index for index, epoch in keys]
    assert len(set(indices)) == 20_000 and all(0 <= index < 10**9 for index in indices)
    assert {epoch for _, epoch in keys} == {3}


def test_a_shard_epoch_resumed_on_another_world_size_sees_every_sample_once():
    order = ShardWindowOrder(np.array([6, 6, 6, 6, 6, 3]), window=2, seed=4)

    def trained(world: int, samples_done: int, steps: int, batch: int) -> List[int]:
        samplers = [EpochSampler(order, world, rank) for rank in range(world)]
        for sampler in samplers:
            sampler.set_epoch(1, samples_done)
        return [index for sampler in samplers for index, _ in list(sampler)[: steps * batch]]

    before = trained(world=3, samples_done=0, steps=2, batch=2)  # 12 positions, then the run stops
    after = trained(world=2, samples_done=12, steps=5, batch=2)  # the 20 positions after them
    assert sorted(before + after) == sorted(order.indices(1, np.arange(32)).tolist())
    assert len(set(before + after)) == 32  # the tail of 1 sample fills no global batch


# ----------------------------------------------------------------------------- the converter and the stages


def test_the_converter_writes_seeded_shards_labels_and_a_summary(tmp_path):
    source = image_folder(tmp_path / "images", per_class=5)
    summary = convert(source, tmp_path / "shards", per_shard=4, prefix="train")
    assert [shard["samples"] for shard in summary["shards"]] == [4, 4, 2]
    assert summary["classes"] == ["blue", "red"] and summary["samples"] == 10
    assert json.loads((tmp_path / "shards" / "train.json").read_text()) == summary
    dataset, nb_classes = build_classification_dataset(
        "image_folder", True, data_path=summary["pattern"], transform=None, image_size=32)
    assert nb_classes == 2 and len(dataset) == 10
    labels = {}
    for index in range(len(dataset)):
        image, label = dataset[index]
        labels[label] = labels.get(label, 0) + 1
        assert image.getpixel((0, 0))[0 if label else 2] > 200  # blue is class 0, red class 1
    assert labels == {0: 5, 1: 5}
    again = convert(source, tmp_path / "again", per_shard=4, prefix="train")
    for first, second in zip(summary["shards"], again["shards"]):
        assert (tmp_path / "shards" / first["path"]).read_bytes() == (tmp_path / "again" / second["path"]).read_bytes()
    with pytest.raises(utils.UsageError, match="already holds a finished conversion"):
        convert(source, tmp_path / "shards", per_shard=4, prefix="train")


def test_finetuning_the_probe_and_knn_train_and_evaluate_on_labelled_shards(tmp_path):
    source = image_folder(tmp_path / "images", per_class=6)
    train = convert(source, tmp_path / "train", per_shard=5)["pattern"]
    val = str(tmp_path / "val")
    convert(source, Path(val), per_shard=7)
    common = [*TINY_VIT, "--batch_size", "4", "--data_path", train, "--eval_data_path", val]
    schedule = ["--epochs", "1", "--warmup_epochs", "0"]
    stats = run_class_finetuning.main(run_class_finetuning.get_args_parser().parse_args(
        common + schedule + ["--output_dir", str(tmp_path / "ft")]))
    assert stats["num_samples"] == 12
    stats = run_linear_probe.main(run_linear_probe.get_args_parser().parse_args(
        common + schedule + ["--output_dir", str(tmp_path / "lp")]))
    assert stats["num_samples"] == 12
    run_knn_eval.main(run_knn_eval.get_args_parser().parse_args(
        common + ["--output_dir", str(tmp_path / "knn"), "--nb_knn", "3"]))
    record = json.loads((tmp_path / "knn" / "log.txt").read_text().splitlines()[-1])
    assert record["num_train"] == record["num_val"] == 12
    assert record["knn_acc1"]["3"] == 100.0  # two solid colours: the nearest neighbours share the label


def test_a_shard_run_stopped_on_two_processes_and_resumed_on_one_trains_every_sample_once(tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(32):
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(folder / f"{index}.jpg")
    pattern = convert(folder, tmp_path / "shards", per_shard=6)["pattern"]
    extra = ["--data_path", pattern, "--shuffle_window", "2"]
    process = start(torchrun(tmp_path / "out", extra), tmp_path / "two")
    seen: List[str] = []
    wait_for_step(process.stdout, epoch=0, step=1, seen=seen)
    process.send_signal(signal.SIGTERM)
    output = finish(process, seen)
    checkpoint = torch.load(tmp_path / "out" / "checkpoint-last.pth", weights_only=True)
    assert checkpoint["epoch"] == 0 and 0 < checkpoint["samples_done"] < 32, output[-3000:]
    before = [index for epoch, index in trained_keys(tmp_path / "two") if epoch == 0]
    assert len(before) == checkpoint["samples_done"]
    capsys.readouterr()
    with recording(tmp_path / "one"):  # the same command on one process, in this one
        run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(
            [*PRETRAIN, *extra, "--num_workers", "0", "--output_dir", str(tmp_path / "out")]))
    output = capsys.readouterr().out
    assert "effective batch 8 in the checkpoint, 4 now (1 process x 4 x 1 accumulation steps): lr = blr" in output
    after = trained_keys(tmp_path / "one")
    assert sorted(before + [index for epoch, index in after if epoch == 0]) == list(range(32))  # each once
    assert {epoch for epoch, _ in after} == {0, 1}
    assert sorted(index for epoch, index in after if epoch == 1) == list(range(32))


def test_shard_images_hold_per_shard_state_only(tmp_path):
    """The dataset keeps counts per shard; a limit trims them; a worker opens each shard once."""
    shards = [write_tar(tmp_path / f"s{index}.tar", {f"k{member}.jpg": jpeg_bytes((member, 100 * index, 0))
                                                     for member in range(5)}) for index in range(3)]
    catalog = catalog_shards(str(tmp_path / "s{0..2}.tar"), None)
    dataset = ShardImages(catalog, None, load_image, limit=7)
    assert len(dataset) == 7 and dataset.shard_counts.tolist() == [5, 2, 0]
    pixels = [dataset[index][0].getpixel((0, 0)) for index in range(7)]
    assert [pixel[1] > 50 for pixel in pixels] == [False] * 5 + [True] * 2  # shard 0's five, then shard 1's
    assert dataset.reader.opened == 2 and len(shards) == 3
    with pytest.raises(IndexError):
        dataset[7]


def test_a_member_that_does_not_decode_is_skipped_named_and_counted_once_an_epoch(tmp_path):
    members = {"a.jpg": jpeg_bytes((200, 0, 0)), "b.jpg": jpeg_bytes((0, 200, 0))[:300], "c.jpg": b"not a jpeg",
               "d.jpg": jpeg_bytes((0, 0, 200))}
    write_tar(tmp_path / "s.tar", members)
    dataset = shard_images(catalog_shards(str(tmp_path / "s.tar"), None), None, load_image, num_samples=None)
    for _ in range(2):  # two epochs
        reset_skipped(dataset)
        with pytest.warns(UserWarning) as caught:
            images = [dataset[index][0] for index in range(len(dataset))]
        assert count_skipped(dataset) == 2
    named = " ".join(str(warning.message) for warning in caught)
    assert f"{tmp_path / 's.tar'}:b.jpg" in named and f"{tmp_path / 's.tar'}:c.jpg" in named
    assert [image.getpixel((0, 0)) for image in images][1:3] == [images[3].getpixel((0, 0))] * 2  # d takes their place


def test_resuming_mid_epoch_under_another_order_says_that_epoch_is_no_longer_exact():
    order = {"seed": 0, "data_path": "a-{0..9}.tar", "num_samples": None, "shuffle_window": 4}
    written = {"seed": 0, "data_path": "a-{0..9}.tar", "num_samples": None, "shuffle_window": 16}
    line = order_change({"epoch": 3, "step": 5, "args": written}, order)
    assert line.startswith("warning: the order of epoch 3 changed (--shuffle_window 16 then, 4 now)")
    assert order_change({"epoch": 3, "args": written}, order) == ""  # at an epoch's end the next starts afresh
    assert order_change({"epoch": 3, "step": 5, "args": {**written, "shuffle_window": 4}}, order) == ""


def test_a_shard_that_changes_during_the_run_is_skipped_on_the_rank_that_meets_it_not_a_stop(tmp_path):
    """A stop on one rank alone would leave the others waiting in their next collective."""
    write_tar(tmp_path / "s0.tar", {"a.jpg": jpeg_bytes((200, 0, 0)), "b.jpg": jpeg_bytes((0, 200, 0))})
    write_tar(tmp_path / "s1.tar", {"c.jpg": jpeg_bytes((0, 0, 200))})
    dataset = shard_images(catalog_shards(str(tmp_path / "s{0..1}.tar"), None), None, load_image, num_samples=None)
    write_tar(tmp_path / "s0.tar", {"a.jpg": jpeg_bytes((200, 0, 0))})  # rewritten, and indexed again
    catalog_shards(str(tmp_path / "s0.tar"), None)
    with pytest.warns(UserWarning, match=r"s0.tar sample [01]: shard .*s0.tar changed since the run started"):
        image, _ = dataset[0]
    assert image.getpixel((0, 0))[2] > 150  # s1's image, past both of s0's
    assert count_skipped(dataset) == 1  # sample 0 itself; sample 1 is counted when its own turn comes
