"""MNIST-style IDX files (Fashion-MNIST as Debian ships it) as a labelled dataset: read as LeCun's
format says, written here byte by byte (no test needs the Debian package); pretraining, its
evaluation and the evaluation scripts run on them; a missing, foreign or truncated file is one
``error:`` line, exit 2, nothing written."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import run_knn_eval
import run_linear_probe
import run_mae_pretraining
import run_synthetic_results
import utils
from datasets import build_classification_dataset
from helpers import TINY_MAE, TINY_VIT, idx_folder, write_idx
from image_data.idx import read_split

GRAY = ["--in_chans", "1", "--mean", "0.3", "--std", "0.35"]


@pytest.mark.parametrize("gz", [True, False])
def test_a_split_reads_back_the_bytes_written_and_samples_are_what_an_image_file_gives(gz, tmp_path):
    folder = idx_folder(tmp_path / "idx", gz=gz)
    images, labels = read_split(str(folder), "val")
    rng = np.random.default_rng(0)
    rng.integers(0, 256, (40, 28, 28))  # the training images come first
    assert np.array_equal(images, rng.integers(0, 256, (20, 28, 28))) and labels.tolist() == [i % 10 for i in range(20)]
    dataset, classes = build_classification_dataset("FashionMNIST", False, data_path=str(folder), transform=None,
                                                    image_size=28, in_chans=1)
    image, label = dataset[3]
    assert classes == 10 and label == 3 and image.shape == (1, 28, 28)
    assert torch.equal(image, torch.tensor(images[3]).float().div(255)[None])  # load_image's grayscale
    rgb, _ = build_classification_dataset("FashionMNIST", False, data_path=str(folder), transform=None,
                                          image_size=28, in_chans=3)[0][3]
    assert np.array_equal(np.asarray(rgb), np.repeat(images[3][..., None], 3, axis=2))


def test_pretraining_with_its_evaluation_and_the_knn_script_run_on_idx_files(tmp_path):
    folder = str(idx_folder(tmp_path / "idx"))
    data = ["--data_set", "FashionMNIST", "--data_path", folder]
    run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(
        [*TINY_MAE, *GRAY, *data, "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "1", "--eval_data_set",
         "FashionMNIST", "--eval_data_path", folder, "--no-eval_probe", "--output_dir", str(tmp_path / "pre")]))
    logged = (tmp_path / "pre" / "log.txt").read_text()
    assert '"knn_acc1"' in logged
    record = run_knn_eval.main(run_knn_eval.get_args_parser().parse_args(
        [*TINY_VIT, *GRAY, *data, "--finetune", str(tmp_path / "pre" / "checkpoint-last.pth"),
         "--output_dir", str(tmp_path / "knn")]))
    assert record["num_train"] == 40 and record["num_val"] == 20


def damage(folder: Path, fault: str) -> None:
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    if fault == "missing":
        labels.unlink()
    elif fault == "magic":
        labels.write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 0x0D, 1, 20) + bytes(80)))  # floats
    else:
        labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:-5]))


@pytest.mark.parametrize("fault, message", [
    ("missing", "t10k-labels-idx1-ubyte[.gz] does not exist"),
    ("magic", "is no IDX file of 1-dimensional unsigned bytes (magic number 00000d01"),
    ("truncated", "holds 23 bytes where its header (20,) says 28: truncated"),
])
def test_a_missing_foreign_or_truncated_idx_file_is_one_line_and_exit_2(fault, message, tmp_path, capsys):
    folder = idx_folder(tmp_path / "idx")
    damage(folder, fault)
    out = tmp_path / "out"
    argv = [*TINY_MAE, *GRAY, "--epochs", "1", "--eval_data_set", "FashionMNIST", "--eval_data_path", str(folder),
            "--output_dir", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(run_mae_pretraining.main, run_mae_pretraining.get_args_parser().parse_args(argv))
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and error.count("\n") == 1, error
    assert not out.exists()


def test_the_raw_pixel_floor_reads_classes_that_the_pixels_themselves_separate(tmp_path, capsys):
    """Class k is a bright band across rows 2k+4 and 2k+5 of a noisy image: a linear model of the
    pixels separates the classes and each image's nearest neighbours are of its class, any encoder
    aside. ``--features pixels`` takes none: with ``--finetune`` it is one error line."""
    folder = tmp_path / "idx"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for prefix, count in (("train", 60), ("t10k", 30)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 8, (count, 28, 28))
        for image, label in zip(images, labels):
            image[2 * label + 4:2 * label + 6] += 200
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz=True)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz=True)
    pixels = [*TINY_VIT, *GRAY, "--data_set", "FashionMNIST", "--data_path", str(folder), "--features", "pixels"]
    argv = [*pixels, "--protocol", "sweep", "--output_dir", str(tmp_path / "sweep")]
    record = run_linear_probe.main(run_linear_probe.get_args_parser().parse_args(argv))
    assert record["features"] == "pixels" and record["acc1"] == 100.0
    knn = run_knn_eval.main(run_knn_eval.get_args_parser().parse_args([*pixels, "--output_dir", str(tmp_path / "knn")]))
    assert knn["features"] == "pixels" and set(knn["knn_acc1"].values()) == {100.0}
    for script, command in ((run_linear_probe, argv), (run_knn_eval, [*pixels, "--output_dir", str(tmp_path / "k")])):
        with pytest.raises(SystemExit) as exit_info:
            utils.exit_on_usage_error(script.main, script.get_args_parser().parse_args(
                [*command, "--finetune", str(folder / "train-images-idx3-ubyte.gz")]))
        assert exit_info.value.code == 2 and "--features pixels is the raw-pixel floor" in capsys.readouterr().err


def test_the_fashion_mnist_results_script_runs_every_step_and_draws_its_figures(tmp_path, capsys):
    """On 40 + 20 tiny images, one epoch each: every row with its command, both figures; without
    the files, one line naming the apt-get command and nothing written."""
    folder = idx_folder(tmp_path / "idx")
    argv = ["--data_set", "FashionMNIST", "--data_path", str(folder), "--output_dir", str(tmp_path / "out"),
            "--num_samples", "40", "--eval_samples", "20", "--batch_size", "8", "--pretrain_epochs", "1",
            "--finetune_epochs", "1", "--num_workers", "0", "--patch_size", "14"]
    report = run_synthetic_results.main(run_synthetic_results.get_args_parser().parse_args(argv))
    rows = [line for line in report.splitlines() if line.startswith("| ") and "`python run_" in line]
    pretrainings = [row for row in rows if "run_mae_pretraining.py" in row]
    assert len(rows) - len(pretrainings) == 8 and 5 <= len(pretrainings) <= 9  # seed 1 of up to 4 close runs
    assert all((tmp_path / "out" / name).is_file() for name in ("results.md", "curve.png", "mask_ratio.png"))
    missing = ["--data_set", "FashionMNIST", "--data_path", str(tmp_path / "none"), "--output_dir", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(run_synthetic_results.main, run_synthetic_results.get_args_parser().parse_args(missing))
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "apt-get install dataset-fashion-mnist" in error and error.count("\n") == 1
    assert not (tmp_path / "x").exists()
