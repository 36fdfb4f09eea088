"""Shards in object storage: a real S3-compatible server (SeaweedFS) and a plain HTTP server, both
started here on 127.0.0.1, read through the bounded local cache with the order, the resume and the
guarantees of local shards."""
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

import image_data.remote
import make_shards
import run_mae_pretraining
from datasets import build_classification_dataset, build_pretraining_dataset
from helpers import PRETRAIN, assert_bitwise_equal, final_state, run_ranks, usage_error_of
from image_data.augmentation import Crops
from image_data.remote import Counts, FetchError, Retrying
from image_data.shard_cache import CacheSettings, ShardCache
from object_storage import http_server, s3_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_data  # noqa: E402
from local_s3 import S3Server  # noqa: E402

SHARDS = "shard-{000000..000005}.tar"  # 32 images, 6 a shard


def image_folder(root: Path, count: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(folder / f"{index}.jpg")
    return root


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> Path:
    """Labelled shards of 6 random images each, with their indexes beside them (make_shards.py)."""
    root = tmp_path_factory.mktemp("objects")
    make_shards.main(make_shards.get_args_parser().parse_args(
        ["--data_path", str(image_folder(root / "images")), "--output_dir", str(root / "shards"),
         "--samples_per_shard", "6", "--prefix", "shard"]))
    return root / "shards"


@pytest.fixture(scope="module")
def s3(tmp_path_factory, local_shards) -> S3Server:
    """The server, the shards under ``s3://data/train/`` without their indexes, and the
    environment every client here reads (and the forked ranks inherit)."""
    with s3_server(tmp_path_factory.mktemp("weed")) as server, pytest.MonkeyPatch.context() as patch:
        for name, value in server.env.items():
            patch.setenv(name, value)
        bare = local_shards.parent / "bare"
        bare.mkdir()
        for shard in local_shards.glob("*.tar"):
            (bare / shard.name).write_bytes(shard.read_bytes())
        server.upload(bare, "s3://data/train")
        yield server


def pretrain(data_path: str, out: Path, *extra: str) -> None:
    run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(
        [*PRETRAIN, "--data_path", data_path, "--shuffle_window", "2", "--num_workers", "0", *extra,
         "--output_dir", str(out)]))


def stopped_on_two_resumed_on_one(data_path: str, out: Path, record: Path) -> None:
    """Rank 1 gets SIGTERM in its micro-step 1: both ranks stop after step 2 of the one epoch with
    its checkpoint; then the same command goes on in this process, on one, to the epoch's end."""
    ended = run_ranks([*PRETRAIN, "--data_path", data_path, "--shuffle_window", "2", "--epochs", "1",
                       "--output_dir", str(out)], record, fault="sigterm", FAULT_STEP="1")
    assert [code for code, _ in ended] == [143, 143], ended[0][1][-3000:] + ended[1][1][-3000:]
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["samples_done"] == 16
    pretrain(data_path, out, "--epochs", "1")


def test_a_run_from_s3_stopped_on_two_processes_and_resumed_on_one_equals_the_run_on_local_shards(
        s3, local_shards, tmp_path):
    stopped_on_two_resumed_on_one(str(local_shards / SHARDS), tmp_path / "local", tmp_path / "local_ranks")
    stopped_on_two_resumed_on_one(f"s3://data/train/{SHARDS}", tmp_path / "s3", tmp_path / "s3_ranks")
    for local, remote in zip(final_state(tmp_path / "local"), final_state(tmp_path / "s3")):  # model, optimizer
        assert_bitwise_equal(local, remote)
    cache = tmp_path / "s3" / "shard_cache"
    assert sorted(path.name.partition("-")[2] for path in (cache / "shards").iterdir()) == [
        f"shard-{index:06d}.tar" for index in range(6)]  # whole shards, and no partial one left
    assert all(path.read_bytes() == (local_shards / path.name.partition("-")[2]).read_bytes()
               for path in (cache / "shards").iterdir())


@pytest.mark.parametrize("case", ["bucket", "object", "credentials", "cache_limit"])
def test_what_cannot_be_read_is_one_error_line_and_exit_2_before_anything_is_written(s3, tmp_path, capsys,
                                                                                   monkeypatch, case):
    data_path = {"bucket": f"s3://missing/{SHARDS}", "object": "s3://data/train/shard-{000004..000006}.tar"}.get(
        case, f"s3://data/train/{SHARDS}")
    extra = ["--shard_cache_gb", "0.00005"] if case == "cache_limit" else []  # 2 shards, not 2 windows of 2
    if case == "credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        monkeypatch.setattr(image_data.remote, "STORES", {})  # a new process's clients, made from this environment
    out = tmp_path / "out"
    err = usage_error_of(run_mae_pretraining, [*PRETRAIN, "--data_path", data_path, "--shuffle_window", "2",
                                               *extra, "--output_dir", str(out)], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    expected = {"bucket": "s3://missing/shard-000000.tar does not exist",
                "object": "s3://data/train/shard-000006.tar does not exist",
                "credentials": "access refused; check the credentials",
                "cache_limit": "--shard_cache_gb 5e-05 holds less than two windows of shards"}[case]
    assert len(lines) == 1 and expected in lines[0], err
    assert "not-the-secret" not in err and "mae-tests-secret" not in err
    if case != "cache_limit":  # that one is known once the shards' sizes are: the cache exists by then
        assert not out.exists()


def test_a_server_killed_mid_run_stops_every_rank_in_one_line_and_the_run_resumes_after_it_returns(
        s3, tmp_path):
    """64 shards of one image, a cache of about three: the workers have read (and keep open) the
    shards of steps 1-7 at most when rank 0 kills the server in step 5, so step 8 needs shards
    that cannot be fetched; the server then starts again on the same data."""
    image_folder(tmp_path / "images", count=64)
    make_shards.main(make_shards.get_args_parser().parse_args(
        ["--data_path", str(tmp_path / "images"), "--output_dir", str(tmp_path / "shards"), "--samples_per_shard",
         "1", "--prefix", "one"]))
    (tmp_path / "bare").mkdir()
    for shard in (tmp_path / "shards").glob("*.tar"):
        (tmp_path / "bare" / shard.name).write_bytes(shard.read_bytes())
    s3.upload(tmp_path / "bare", "s3://data/ones")
    out, data_path = tmp_path / "out", "s3://data/ones/one-{000000..000063}.tar"
    argv = [*PRETRAIN, "--data_path", data_path, "--num_samples", "64", "--shuffle_window", "1", "--epochs", "1",
            "--shard_cache_gb", "0.00003", "--shard_retries", "1", "--output_dir", str(out)]
    ended = run_ranks(argv, tmp_path / "ranks", fault="kill_server", rank=0, FAULT_STEP="4",
                      SERVER_PID=str(s3.process.pid))
    s3.start()  # before any assertion: the module's other tests read from it
    for code, output in ended:
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert code == 1 and len(errors) == 1, output[-3000:]
        assert "cannot fetch s3://data/ones/one-0000" in errors[0] and "every rank stops" in errors[0], errors
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["samples_done"] in (24, 48)  # step 3's or 6's
    pretrain(data_path, out, "--num_samples", "64", "--shuffle_window", "1", "--epochs", "1", "--shard_cache_gb",
             "0.00003")
    finished = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert finished["epoch"] == 0 and finished.get("samples_done", 0) == 0  # the epoch's end


def test_shards_over_http_read_as_the_local_files_and_their_labels(local_shards, tmp_path):
    (local_shards / "list.txt").write_text("# a list file beside the shards, itself read over HTTP\n"
                                           + "\n".join(f"shard-{index:06d}.tar" for index in range(6)))
    with http_server(local_shards) as base:
        for spec in (f"{base}/{SHARDS}", f"{base}/list.txt"):
            cache = CacheSettings(str(tmp_path / "cache"), 1.0)
            remote, classes = build_classification_dataset("image_folder", True, data_path=spec, transform=None,
                                                           image_size=32, cache=cache)
            local, local_classes = build_classification_dataset("image_folder", True, data_path=str(
                local_shards / SHARDS), transform=None, image_size=32)
            assert classes == local_classes == 2 and len(remote) == len(local) == 32
            for index in (0, 13, 31):
                assert remote[index][1] == local[index][1]
                assert np.array_equal(np.asarray(remote[index][0]), np.asarray(local[index][0]))


def test_an_index_beside_the_remote_shard_is_used_and_make_shards_puts_it_there(s3, local_shards, tmp_path):
    """``make_shards.py --index`` on a prefix, its worker's job done here (the pool only spawns it)."""
    s3.upload(local_shards.parent / "bare", "s3://data/indexed")
    shards = make_shards.shard_paths("s3://data/indexed/")
    assert [make_shards.index_shard((url, str(tmp_path / "indexing"))) for url in shards] == [6, 6, 6, 6, 6, 2]
    cache = CacheSettings(str(tmp_path / "cache"), 1.0)
    dataset = build_pretraining_dataset("image_folder", f"s3://data/indexed/{SHARDS}", Crops(32), cache=cache)
    assert len(dataset) == 32
    assert not any((tmp_path / "cache" / "shards").iterdir())  # indexed without downloading a shard


def test_bench_data_remote_times_s3_against_local_shards_cold_and_warm(s3, capsys):
    bench_data.main(bench_data.parse_args(["--remote", "--num_images", "16", "--samples_per_shard", "4",
                                           "--num_workers", "1", "--batch_size", "4", "--input_size", "32",
                                           "--windows", "1"]))
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["remote_vs_local"]
    assert report["local_warm_images_per_s"] > 0 and report["s3_warm"]["images_per_s"] > 0
    shard_bytes = report["s3_cold"]["bytes_per_sample"]
    assert report["s3_cold"]["requests_per_sample"] == 1 / 4 and shard_bytes > 0  # one GET per shard of 4
    assert report["s3_warm"]["requests_per_sample"] == 0  # every shard from the cache
    assert report["s3_cold_without_prefetch"]["bytes_per_sample"] == shard_bytes


class FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Answers the first ``failures`` GETs with 503, as a throttled store does."""

    failures: List[int] = [2]

    def do_GET(self) -> None:
        if self.failures[0] > 0:
            self.failures[0] -= 1
            self.send_error(503, "slow down")
            return
        super().do_GET()

    def log_message(self, format: str, *args) -> None:
        pass


def test_transient_errors_are_retried_and_counted_and_the_cache_stays_within_its_limit(local_shards, tmp_path):
    import functools
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        FlakyHandler, directory=str(local_shards)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    size = (local_shards / "shard-000000.tar").stat().st_size
    cache = ShardCache(CacheSettings(str(tmp_path / "cache"), limit_gb=2.5 * size / (1 << 30),
                                     retrying=Retrying(retries=2, first_wait=0.01)))
    cache.make_folders()
    retries = Counts.retries
    try:
        threads = [threading.Thread(target=cache.shard, args=(f"{base}/shard-000000.tar", size)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert Counts.retries - retries == 2  # the two 503s, once: the other threads found the shard there
        for index in (1, 2, 3):
            cache.shard(f"{base}/shard-{index:06d}.tar", (local_shards / f"shard-{index:06d}.tar").stat().st_size)
        kept = sorted(path.name.partition("-")[2] for path in (tmp_path / "cache" / "shards").iterdir())
        assert kept == ["shard-000002.tar", "shard-000003.tar"]  # the least recently used went first
        FlakyHandler.failures[0] = 3
        with pytest.raises(FetchError, match=r"cannot fetch http://127.0.0.1:\d+/shard-000004.tar after 3 tries"):
            cache.shard(f"{base}/shard-000004.tar", size)
        assert not any(name.endswith(".partial") for name in os.listdir(tmp_path / "cache" / "shards"))
    finally:
        server.shutdown()
        server.server_close()


def test_a_full_cache_disk_is_one_line_naming_the_cache(local_shards, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        cache = ShardCache(CacheSettings(str(disk / "cache"), limit_gb=1.0))  # a limit the disk cannot hold
        cache.make_folders()
        with http_server(local_shards) as base, pytest.raises(FetchError) as failure:
            for index in range(6):
                name = f"shard-{index:06d}.tar"
                cache.shard(f"{base}/{name}", (local_shards / name).stat().st_size)
        assert str(failure.value).startswith(f"cannot write {base}/shard-0000")
        assert str(failure.value).endswith(f"into the shard cache {disk / 'cache'}: No space left on device; free "
                                           "space there or lower --shard_cache_gb")
        assert not any(name.endswith(".partial") for name in os.listdir(disk / "cache" / "shards"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)
