"""Nothing lost, nothing let in: kill-and-resume, atomic writes, bad files, bad input, pickles."""
import json
import os
import re
import signal
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import modeling_pretrain
import run_class_finetuning
import run_mae_pretraining
from training import precision
from training.checkpoint import TrainingState
from training.checkpoint_files import load_checkpoint, save_atomic
from training.config import optimizer_of, resolve_pretraining, training_of
from training.loop import train_epoch
from training.nonfinite import NonFiniteWatch
from datasets import DECODERS, build_pretraining_dataset
from helpers import TINY_MAE, TINY_VIT, WritesAFile, assert_bitwise_equal, final_state, usage_error
from image_data.augmentation import Crops
from image_data.files import count_skipped
from modeling_finetune import create_finetune_model
from optim_factory import create_optimizer

REPO = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"^epoch \d+ \[\d+/\d+\]")
COMMON = ["--print_freq", "1", "--warmup_epochs", "1"]
PRETRAIN = [*TINY_MAE, "--num_samples", "24", "--batch_size", "4", "--epochs", "2", "--blr", "1e-3",
            "--save_ckpt_steps", "2", *COMMON]
FINETUNE = [*TINY_VIT, "--num_samples", "24", "--batch_size", "4", "--epochs", "2", "--mixup", "0.8", "--cutmix", "1.0",
            "--drop_path", "0.1", "--save_ckpt_steps", "2", *COMMON]
# 12 steps in all, 2 epochs of 6 with a step checkpoint after steps 2 and 4 of each: the kill lands
# after epoch 1's step 3, so the relaunch crosses an epoch's end and replays from a step checkpoint
KILL_AFTER_STEPS = 9


def start(script: str, argv, out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")  # the threads of this process (conftest)
    return subprocess.Popen([sys.executable, str(REPO / script), *argv, "--output_dir", str(out)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_and_kill(script: str, argv, out: Path, after_steps: int) -> None:
    """SIGKILL the run right after its ``after_steps``-th progress line (one per step)."""
    process = start(script, argv, out)
    seen = 0
    for line in process.stdout:
        seen += bool(PROGRESS.match(line))
        if seen == after_steps:
            process.send_signal(signal.SIGKILL)
            break
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended before step {after_steps}"


def test_finetuning_killed_between_step_checkpoints_and_relaunched_ends_bitwise_equal(tmp_path, capsys):
    """The file checkpoints' proof (pretraining's shares the loop, and its sharded ones are killed
    under an elastic torchrun in test_sharding); finetuning brings mixup, cutmix and drop path,
    whose draws must resume too. The uninterrupted run and the relaunch run in this process, with
    its threads; only the killed run needs a process of its own."""
    parse = run_class_finetuning.get_args_parser().parse_args
    run_class_finetuning.main(parse(FINETUNE + ["--output_dir", str(tmp_path / "straight")]))
    run_and_kill("run_class_finetuning.py", FINETUNE, tmp_path / "killed", KILL_AFTER_STEPS)
    capsys.readouterr()
    run_class_finetuning.main(parse(FINETUNE + ["--output_dir", str(tmp_path / "killed")]))
    output = capsys.readouterr().out
    assert "resumed from" in output and "at epoch 1 step" in output, output[-2000:]
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "killed")
    assert_bitwise_equal(straight[0], resumed[0])
    assert_bitwise_equal(straight[1], resumed[1])


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    target = tmp_path / "checkpoint-last.pth"
    save_atomic({"model": {"w": torch.ones(3)}, "epoch": 4}, target)
    writer = (
        "import sys, torch\nfrom training import checkpoint_files\n"
        "checkpoint_files.save_atomic({'model': {'w': torch.zeros(64, 1024, 1024)}, 'epoch': 5}, sys.argv[1])\n"
    )
    process = subprocess.Popen([sys.executable, "-c", writer, str(target)], cwd=REPO)
    temporary = tmp_path / ".checkpoint-last.pth.tmp"
    while not temporary.exists() and process.poll() is None:
        pass
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    if process.returncode != -signal.SIGKILL:
        pytest.skip("the 256 MB write finished before the kill landed")
    checkpoint = load_checkpoint(target)
    assert checkpoint["epoch"] == 4 and torch.equal(checkpoint["model"]["w"], torch.ones(3))


def test_a_corrupt_newest_checkpoint_is_reported_and_the_older_one_used(tmp_path, capsys):
    out = tmp_path / "out"
    run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(
        PRETRAIN + ["--save_ckpt_freq", "1", "--output_dir", str(out)]))
    last = out / "checkpoint-last.pth"
    last.write_bytes(last.read_bytes()[:1000])  # a copy cut short
    capsys.readouterr()
    args = run_mae_pretraining.get_args_parser().parse_args(PRETRAIN + ["--epochs", "3", "--output_dir", str(out)])
    run_mae_pretraining.main(args)
    captured = capsys.readouterr()
    assert "checkpoint-last.pth is truncated or corrupt" in captured.err
    assert "resumed from" in captured.out and "checkpoint-1.pth at epoch 2" in captured.out


def write_broken_images(folder: Path) -> None:
    """Five good JPEGs, three that do not decode, and a decompression bomb."""
    folder.mkdir()
    for index in range(5):
        Image.new("RGB", (48, 40), (index * 40, 90, 200)).save(folder / f"good{index}.jpg", quality=90)
    (folder / "truncated.jpg").write_bytes((folder / "good0.jpg").read_bytes()[:400])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is text, not a JPEG")
    bomb_png(folder / "bomb.png")


def bomb_png(path: Path, side: int = 14000) -> None:
    """A valid 1-bit PNG of side x side black pixels, over PIL's decompression-bomb limit, written
    without ever holding the image: a few kilobytes that decode to 196 million pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # width, height, 1 bit, greyscale
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + side // 8)  # filter byte, then the packed pixels
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_skips_names_and_counts_each_unreadable_and_oversized_file(tmp_path, decoder):
    """What a data-loader worker does with each file, for every ``--decoder``: an unreadable or
    oversized file gives way to the next readable one, with a warning naming it, counted once."""
    write_broken_images(tmp_path / "images")
    with Image.open(tmp_path / "images" / "bomb.png") as image:
        assert image.size == (14000, 14000)  # a real image, PIL would decode it were it allowed
    dataset = build_pretraining_dataset("image_folder", str(tmp_path / "images"), Crops(32), decoder=decoder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [dataset[index] for index in range(len(dataset))]
    said = sorted({str(warning.message).split(":")[0] for warning in caught  # met again as a stand-in: once
                   if str(warning.message).startswith("skipping")})
    assert said == [f"skipping oversized image {tmp_path / 'images' / 'bomb.png'}",
                    *(f"skipping unreadable image {tmp_path / 'images' / name}"
                      for name in ("empty.jpg", "notes.jpg", "truncated.jpg"))], said
    assert "14000 x 14000 pixels is over --max_image_pixels 178956970" in " ".join(map(str, caught))
    assert len(samples) == 9 and count_skipped(dataset) == 4


def test_a_folder_with_unreadable_and_oversized_files_trains_to_the_end_and_logs_the_count(tmp_path):
    data = tmp_path / "images"
    write_broken_images(data)
    out = tmp_path / "out"
    argv = PRETRAIN + ["--data_path", str(data), "--num_samples", "9", "--epochs", "1", "--output_dir", str(out)]
    with pytest.warns(UserWarning, match="skipping (unreadable|oversized) image"):
        run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(argv))
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["epoch"] == 0 and record["skipped_images"] == 4  # distinct files, not reads


@pytest.fixture(scope="module")
def mismatched_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a 2-block model: its keys do not fit the 12-block tiny models."""
    model = create_finetune_model("vit_tiny_patch16_224", 10, img_size=32, depth=2)
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    save_atomic({"model": model.state_dict()}, path)
    return path


PRETRAIN_ERRORS = [
    (["--input_size", "40"], "not divisible by the patch size 16"),
    (["--mask_ratio", "1.0"], "--mask_ratio"),
    (["--decoder", "tensor"], "the synthetic dataset has none"),
    (["--decoder", "device"], "the synthetic dataset has none"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--clip_grad", "-1"], "--clip_grad must be a positive norm"),
    (["--model", "pretrain_mae_bas_patch16_224"], "did you mean pretrain_mae_base_patch16_224"),
    (["--data_path", "/no/such/folder"], "--data_path /no/such/folder is neither a directory nor tar shards"),
    (["--resume", "/no/such/checkpoint.pth"], "does not exist"),
    (["--eval_data_path", "/no/such/folder"], "--eval_data_path /no/such/folder is neither a directory nor tar shards"),
    (["--eval_data_set", "IMNET"], "--eval_data_set IMNET needs --eval_data_path"),
    (["--eval_val_path", "{labelled}"], "--eval_val_path names the validation split of --eval_data_path"),
    (["--eval_data_path", "{flat}"], "has no class subfolders with images"),
    (["--eval_data_set", "image_folder", "--eval_data_path", "{labelled}/train"], "--eval_val_path, which is missing"),
    (["--in_chans", "1", "--mean", "0.5", "--std", "0.5", "--eval_data_set", "CIFAR10", "--eval_data_path", "{flat}"],
     "CIFAR10 images are RGB"),
]
FINETUNE_ERRORS = [
    (["--finetune", "/no/such/mae.pth"], "--finetune /no/such/mae.pth does not exist"),
    (["--finetune", "{bad}"], "missing ['blocks.10.attn.proj.bias'"),
    (["--resume", "{bad}"], "missing: blocks.10.attn.proj.bias"),
]


@pytest.mark.parametrize("extra, message", PRETRAIN_ERRORS)
def test_bad_pretraining_command_lines_exit_2_and_write_nothing(extra, message, tmp_path, capsys):
    """``{flat}``: train/ and val/ of images without class folders; ``{labelled}``: with them."""
    out = tmp_path / "out"
    for root, kind in (("flat", ""), ("labelled", "a")):
        for split in ("train", "val"):
            (tmp_path / root / split / kind).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / root / split / kind / "x.png")
    extra = [item.replace("{flat}", str(tmp_path / "flat")).replace("{labelled}", str(tmp_path / "labelled"))
             for item in extra]
    parser = run_mae_pretraining.get_args_parser()
    error = usage_error(run_mae_pretraining.main, parser, PRETRAIN + extra + ["--output_dir", str(out)], capsys)
    assert message in error and error.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("extra, message", FINETUNE_ERRORS)
def test_bad_finetuning_command_lines_exit_2_and_write_nothing(extra, message, mismatched_checkpoint, tmp_path,
                                                               capsys):
    out = tmp_path / "out"
    extra = [str(mismatched_checkpoint) if item == "{bad}" else item for item in extra]
    parser = run_class_finetuning.get_args_parser()
    error = usage_error(run_class_finetuning.main, parser, FINETUNE + extra + ["--output_dir", str(out)], capsys)
    assert message in error and error.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())


def test_a_folder_with_no_readable_image_exits_2_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "images"
    data.mkdir()
    (data / "empty.jpg").write_bytes(b"")
    (data / "notes.png").write_text("not an image")
    bomb_png(data / "bomb.png")
    out = tmp_path / "out"
    error = usage_error(run_mae_pretraining.main, run_mae_pretraining.get_args_parser(),
                        [*PRETRAIN, "--data_path", str(data), "--batch_size", "1", "--output_dir", str(out)], capsys)
    assert error.startswith("error: none of the 3 images can be read; the last: ") and error.count("\n") == 1
    assert not out.exists()


def test_an_image_file_as_data_path_is_one_line_asking_for_its_folder(tmp_path, capsys):
    image = tmp_path / "photos" / "cat.JPG"
    image.parent.mkdir()
    Image.new("RGB", (40, 40), (200, 90, 10)).save(image, format="JPEG")
    out = tmp_path / "out"
    parser = run_mae_pretraining.get_args_parser()
    error = usage_error(run_mae_pretraining.main, parser, PRETRAIN + ["--data_path", str(image), "--output_dir",
                                                                      str(out)], capsys)
    assert error == f"error: {image} is one image file; name the folder that holds the images ({image.parent}), " \
                    "or tar shards\n"
    assert not out.exists()


def test_an_unwritable_output_dir_exits_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    parser = run_mae_pretraining.get_args_parser()
    error = usage_error(run_mae_pretraining.main, parser, PRETRAIN + ["--output_dir", str(blocker / "out")], capsys)
    assert "--output_dir" in error and "cannot be written" in error


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path, capsys):
    evidence = tmp_path / "pwned.txt"
    checkpoint = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": WritesAFile(str(evidence))}, checkpoint)
    assert not evidence.exists()
    parser = run_class_finetuning.get_args_parser()
    error = usage_error(run_class_finetuning.main, parser,
                        FINETUNE + ["--finetune", str(checkpoint), "--output_dir", str(tmp_path / "o")], capsys)
    assert "would run code" in error and "refused" in error
    assert not evidence.exists()


def test_a_non_finite_loss_stops_the_run_and_leaves_the_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    parse = run_mae_pretraining.get_args_parser().parse_args
    run_mae_pretraining.main(parse(PRETRAIN + ["--epochs", "1", "--output_dir", str(out)]))
    before = (out / "checkpoint-last.pth").read_bytes()
    real_loss = modeling_pretrain.PretrainVisionTransformer.forward_loss
    calls = []

    def poisoned(self, imgs, pred, mask):
        calls.append(1)
        loss = real_loss(self, imgs, pred, mask)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(modeling_pretrain.PretrainVisionTransformer, "forward_loss", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        run_mae_pretraining.main(parse(PRETRAIN + ["--output_dir", str(out)]))
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "loss is not finite at epoch 1 step 1" in error and "lr" in error and "loss scale" in error
    assert (out / "checkpoint-last.pth").read_bytes() == before


def test_fp16_tolerates_isolated_non_finite_losses_but_not_a_run_of_them():
    watch = NonFiniteWatch(torch.device("cpu"), patience=3)
    for step, value in enumerate([1.0, float("inf"), float("nan"), 2.0, float("nan"), float("nan")]):
        watch.observe(torch.tensor(value), step)
    assert int(watch.first_bad) == -1
    watch.observe(torch.tensor(float("inf")), 6)
    assert int(watch.first_bad) == 6


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_500_steps_do_not_grow_process_memory(tmp_path):
    """Anything kept per step (a loss tensor with its graph, a log list) would add up here."""
    args = run_mae_pretraining.get_args_parser().parse_args(PRETRAIN + ["--print_freq", "50"])
    args = resolve_pretraining(args)  # one process on the CPU: rank 0 of 1, amp none
    model = timm.create_model("pretrain_mae_tiny_patch16_224", img_size=32, depth=1, decoder_depth=1)  # fast steps
    optimizer = create_optimizer(optimizer_of(args), model, torch.device("cpu"))
    scaler = precision.make_grad_scaler(torch.device("cpu"), "none")
    imgs, mask = torch.randn(4, 3, 32, 32), torch.tensor([[True, True, True, False]] * 4)
    steps, rss = [], []

    def loss_fn(batch):
        if len(steps) in (100, 499):
            rss.append(resident_bytes())
        steps.append(batch)
        return model.forward_loss(imgs, model(imgs, mask, 3), mask)

    training = training_of(args, run_mae_pretraining.get_args_parser())
    train_epoch(TrainingState(model, optimizer, scaler), [None] * 500, loss_fn, device=torch.device("cpu"), epoch=0,
                stepping=training.stepping, schedule=training.schedule)
    warm, end = rss
    assert end - warm < 8 * 2**20, f"grew by {(end - warm) / 2**20:.1f} MiB over 400 steps"


FAULTS_PER_REUSE = """
import resource, sys, torch
sys.path.insert(0, {repo!r})
from training import performance

def minor_faults_of_reuse() -> int:
    torch.empty(4 * 2**20).fill_(1.0)  # 16 MiB, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(4 * 2**20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(minor_faults_of_reuse(), performance.reuse_freed_memory(), minor_faults_of_reuse())
"""


def test_on_cpu_freed_tensors_are_reused_without_fresh_page_faults():
    """By default glibc hands some freed 16 MiB blocks back to the kernel, and the next one
    faults in afresh as it is filled (4,096 pages); after ``training.performance.reuse_freed_memory`` the freed
    block is served again, already mapped. The kernel's fault counter is the witness."""
    script = FAULTS_PER_REUSE.format(repo=str(REPO))
    before, applied, after = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                            check=True).stdout.split()
    if applied != "True":
        pytest.skip("the C library is not glibc")
    assert int(before) >= 4096 and int(after) < 100, (before, after)
