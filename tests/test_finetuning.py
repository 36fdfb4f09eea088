"""End-to-end finetuning on CPU: tiny model, tiny synthetic images, checked against the recipe."""
import functools
import json
import os
import shlex
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import posterize
from torchvision import transforms

import run_class_finetuning
import run_mae_pretraining
import run_mae_vis
import utils
from image_data.augmentation import (
    CLASSIFY_CROP_SCALE,
    BatchTransform,
    Crops,
    build_classification_transform,
    eval_resize,
    normalize_on_device,
)
from training.config import labelled_data_of, optimizer_of, resolve_classification
from training.lr_schedule import set_learning_rate
from evaluation.setup import build_datasets
from modeling_finetune import create_finetune_model
from optim_factory import create_optimizer
from helpers import TINY_MAE, TINY_VIT

SEED_COMMAND = (
    "--model vit_base_patch16_224 --data_path {data} --finetune {ckpt} --output_dir {out} --batch_size 128 "
    "--opt adamw --opt_betas 0.9 0.999 --weight_decay 0.05 --epochs 100 --dist_eval"
)
PRETRAIN = [*TINY_MAE, "--num_samples", "32", "--batch_size", "16", "--epochs", "1", "--warmup_epochs", "1",
            "--print_freq", "1"]
FINETUNE = [*TINY_VIT, "--num_samples", "48", "--batch_size", "16", "--warmup_epochs", "1", "--blr", "1e-3",
            "--print_freq", "1"]


def parse(argv):
    return run_class_finetuning.get_args_parser().parse_args(argv)


def read_log(out: Path):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def finetuned(pretrained_mae, tmp_path_factory) -> Path:
    """Two epochs of finetuning from the shared MAE checkpoint with mixup and cutmix."""
    out = tmp_path_factory.mktemp("finetune")
    argv = FINETUNE + ["--epochs", "2", "--finetune", str(pretrained_mae), "--mixup", "0.8", "--cutmix", "1.0",
                       "--output_dir", str(out)]
    run_class_finetuning.main(parse(argv))
    return out


def test_seed_readme_command_parses(tmp_path):
    argv = shlex.split(SEED_COMMAND.format(data=tmp_path, ckpt=tmp_path / "m.pth", out=tmp_path / "o"))
    args = parse(argv + ["--local_rank=1"])
    assert args.model == "vit_base_patch16_224" and args.batch_size == 128 and args.epochs == 100
    assert args.opt_betas == [0.9, 0.999] and args.weight_decay == 0.05 and args.dist_eval
    assert args.global_pool and not parse(["--cls_token"]).global_pool
    assert args.aa == "rand-m9-mstd0.5-inc1" and args.layer_decay == 0.75 and args.local_rank == 1


def test_layer_decay_scales_are_the_papers_formula():
    """12 blocks: layer 0 is patch embedding, cls token and position embedding, layer i is block
    i - 1 and layer 13 the head, and each is scaled by 0.75 ** (13 - i)."""
    args = parse(["--model", "vit_tiny_patch16_224", "--lr", "1.0"])
    model = create_finetune_model("vit_tiny_patch16_224", 10, img_size=32)
    optimizer = create_optimizer(optimizer_of(args), model, torch.device("cpu"))
    set_learning_rate(optimizer, 1.0)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}

    def layer(name: str) -> int:
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return 13

    for name, param in model.named_parameters():
        assert lr_of[id(param)] == pytest.approx(0.75 ** (13 - layer(name)), rel=1e-12), name
    no_decay = {n for n, p in model.named_parameters() for g in optimizer.param_groups
                if g["weight_decay"] == 0 and any(p is q for q in g["params"])}
    assert {"cls_token", "pos_embed", "blocks.0.norm1.weight", "head.bias"} <= no_decay
    assert "blocks.0.attn.qkv.weight" not in no_decay


def test_finetune_from_mae_checkpoint_logs_accuracy_and_keeps_the_best(finetuned):
    records = read_log(finetuned)
    assert [r["epoch"] for r in records] == [0, 1]
    for record in records:
        assert 0 <= record["test_acc1"] <= record["test_acc5"] <= 100
        assert {"train_loss", "test_acc1", "test_acc5", "n_parameters"} <= record.keys()
    best = torch.load(finetuned / "checkpoint-best.pth", map_location="cpu", weights_only=True)
    assert best["max_accuracy"] == max(r["test_acc1"] for r in records)
    assert isinstance(best["args"], dict) and "head.weight" in best["model"]


def test_eval_reproduces_the_logged_accuracy(finetuned, tmp_path):
    best = torch.load(finetuned / "checkpoint-best.pth", map_location="cpu", weights_only=True)
    logged = next(r for r in read_log(finetuned) if r["epoch"] == best["epoch"])
    argv = FINETUNE + ["--eval", "--resume", str(finetuned / "checkpoint-best.pth"), "--output_dir", str(tmp_path)]
    stats = run_class_finetuning.main(parse(argv))
    assert stats["acc1"] == pytest.approx(logged["test_acc1"])
    assert stats["acc5"] == pytest.approx(logged["test_acc5"])
    assert stats["num_samples"] == 48


def test_resume_keeps_the_best_accuracy(finetuned, tmp_path):
    """Continue the finetuning run by one epoch: max_accuracy never drops below what it was."""
    before = read_log(finetuned)[-1]["max_accuracy"]
    run_class_finetuning.main(parse(FINETUNE + ["--epochs", "3", "--output_dir", str(finetuned)]))
    records = read_log(finetuned)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[-1]["max_accuracy"] == max(before, records[-1]["test_acc1"])


def test_rerunning_a_finished_run_trains_nothing_and_reports_its_last_accuracy(finetuned, capsys):
    last = read_log(finetuned)[-1]
    stats = run_class_finetuning.main(parse(FINETUNE + ["--epochs", str(last["epoch"] + 1), "--output_dir", str(finetuned)]))
    assert read_log(finetuned)[-1] == last  # no epoch ran
    assert stats["acc1"] == pytest.approx(last["test_acc1"]) and stats["num_samples"] == 48
    assert "nothing left to train" in capsys.readouterr().out


def usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(run_class_finetuning.main, parse(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_wrong_nb_classes_names_both_numbers(tmp_path, capsys):
    out = tmp_path / "never"
    message = usage_error(FINETUNE + ["--nb_classes", "7", "--output_dir", str(out)], capsys)
    assert "--nb_classes 7" in message and "10 classes" in message
    assert not out.exists()


def test_missing_cifar_files_are_an_error_not_a_download(tmp_path, capsys):
    message = usage_error(FINETUNE + ["--data_set", "CIFAR10", "--data_path", str(tmp_path),
                                      "--output_dir", str(tmp_path / "o")], capsys)
    assert "cifar-10-batches-py" in message and "never downloads" in message
    assert os.listdir(tmp_path) == []


def test_finetune_checkpoint_of_another_size_is_rejected(pretrained_mae, tmp_path, capsys):
    message = usage_error(FINETUNE + ["--model", "vit_small_patch16_224", "--finetune", str(pretrained_mae),
                                      "--output_dir", str(tmp_path / "o")], capsys)
    assert "--finetune" in message and "shapes" in message


def test_imagenet_layout_and_eval_transform(tmp_path):
    """train/ and val/ class folders; evaluation resizes to input / 0.875 and center-crops."""
    for split in ("train", "val"):
        for cls in ("cat", "dog", "eel"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (50, 40), (10, 20, 30)).save(tmp_path / split / cls / "a.png")
    args = parse(FINETUNE + ["--data_path", str(tmp_path)])
    args = resolve_classification(args)
    assert args.data_set == "IMNET"
    train_set, val_set, nb_classes = build_datasets(labelled_data_of(args),
                                                   functools.partial(run_class_finetuning.finetune_transform, args),
                                                   train=True)
    assert nb_classes == 3 and args.nb_classes == 3 and len(train_set) == len(val_set) == 3
    assert eval_resize(224) == 256 and eval_resize(32) == int(32 / 0.875)
    assert val_set[0][0].shape == (3, 32, 32) and train_set[0][0].shape == (3, 32, 32)
    resize = build_classification_transform(False, Crops(64)).transforms[0]
    assert resize.size == 73 and resize.interpolation.value == "bicubic"


def noisy_picture(size: Tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_uint8_workers_and_device_normalization_give_timms_float_pipelines():
    """Workers stop at uint8; normalized on the device, the crops must equal bit for bit what
    timm's float training pipeline (random erasing off) and the ToTensor + Normalize evaluation
    pipeline made in the workers, under the same seeds."""
    picture = noisy_picture((50, 40), seed=0)
    normalize = BatchTransform(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    timm_train = create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                  interpolation="bicubic", re_prob=0.0)
    float_eval = transforms.Compose([
        transforms.Resize(eval_resize(32), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(32), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])
    for is_train, reference in ((True, timm_train), (False, float_eval)):
        for seed in range(4):
            utils.seed_everything(seed)
            expected = reference(picture)
            utils.seed_everything(seed)
            crop = build_classification_transform(is_train, Crops(32, CLASSIFY_CROP_SCALE))(picture)
            assert crop.dtype == torch.uint8
            assert torch.equal(normalize(crop[None])[0], expected)


def test_device_random_erasing_replaces_one_rectangle_of_each_image_with_noise(device):
    """timm's erasing (as DeiT and MAE finetune): at probability 1 each image gets one rectangle
    of 2% to 1/3 of its area, aspect 0.3 to 1/0.3, filled with normal noise; the rest is the
    normalized image. At probability 0 the transform only normalizes."""
    imgs = torch.full((6, 3, 40, 40), 128, dtype=torch.uint8, device=device)  # (B, 3, H, W)
    plain = normalize_on_device(imgs, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert torch.equal(BatchTransform(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(imgs), plain)
    utils.seed_everything(0)
    erased = BatchTransform(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, re_prob=1.0)(imgs)
    assert erased.device.type == device.type
    erased, plain = erased.cpu(), plain.cpu()
    for image, original in zip(erased, plain):
        changed = (image != original).any(dim=0)  # (H, W)
        rows, cols = changed.any(dim=1).nonzero()[:, 0], changed.any(dim=0).nonzero()[:, 0]
        height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int(changed.sum()) == height * width  # one filled rectangle
        # the sides are sqrt(area * aspect) and sqrt(area / aspect), rounded to whole pixels
        assert (height - 0.5) * (width - 0.5) <= 40 * 40 / 3 and (height + 0.5) * (width + 0.5) >= 0.02 * 40 * 40
        assert (height + 0.5) / (width - 0.5) >= 0.3 and (height - 0.5) / (width + 0.5) <= 1 / 0.3
        noise = image[:, changed]  # (3, h * w)
        assert abs(float(noise.mean())) < 0.5 and 0.7 < float(noise.std()) < 1.3


def test_randaugment_full_strength_posterize_works_with_pinned_pillow():
    """timm's RandAugment posterizes to 0 bits at magnitude 10; Pillow 13 refuses that (hence the pin)."""
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert posterize(image, 0).getpixel((0, 0)) == (0, 0, 0)


def test_finetune_at_another_input_size_resamples_position_embeddings(pretrained_mae, tmp_path):
    """A 32-pixel (2x2 grid) MAE checkpoint finetuned at 48 pixels (3x3 grid)."""
    argv = FINETUNE + ["--epochs", "1", "--finetune", str(pretrained_mae), "--output_dir", str(tmp_path)]
    argv[argv.index("--input_size") + 1] = "48"
    stats = run_class_finetuning.main(parse(argv))
    assert stats["num_samples"] == 48
    model = torch.load(tmp_path / "checkpoint-last.pth", map_location="cpu", weights_only=True)["model"]
    assert model["pos_embed"].shape == (1, 1 + 9, 192)


def test_a_smaller_patch_size_carries_from_pretraining_to_finetuning_and_pictures(tmp_path, capsys):
    """--patch_size 8 at 32 px: a 4 x 4 grid of 8 x 8 x 3 = 192-pixel patches all the way through."""
    pre = tmp_path / "pre"
    run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(
        PRETRAIN + ["--patch_size", "8", "--num_samples", "16", "--output_dir", str(pre)]))
    state = torch.load(pre / "checkpoint-0.pth", weights_only=True)["model"]
    assert state["patch_embed.proj.weight"].shape == (192, 3, 8, 8)
    assert state["decoder_pred.weight"].shape[0] == 8 * 8 * 3 and state["pos_embed"].shape == (1, 1 + 16, 192)
    out = tmp_path / "ft"
    stats = run_class_finetuning.main(parse(FINETUNE + ["--patch_size", "8", "--epochs", "1", "--num_samples", "16",
                                                       "--finetune", str(pre / "checkpoint-0.pth"), "--output_dir", str(out)]))
    assert 0 <= stats["acc1"] <= 100
    message = usage_error(FINETUNE + ["--finetune", str(pre / "checkpoint-0.pth"), "--output_dir", str(tmp_path / "o")],
                          capsys)  # forgot --patch_size: the 16-pixel model cannot take 8-pixel patches
    assert "patch_embed.proj.weight" in message
    [picture] = run_mae_vis.main(run_mae_vis.get_args_parser().parse_args(
        ["synthetic", str(tmp_path / "vis"), "--model_path", str(pre / "checkpoint-0.pth"), "--num_images", "2",
         "--device", "cpu"]))
    with Image.open(picture) as grid:
        assert grid.width >= 4 * 32  # four panels of the 32-pixel image


def mae_rule(name: str, param: torch.Tensor, depth: int, layer_decay: float, weight_decay: float) -> tuple:
    """MAE's param_groups_lrd and get_layer_id_for_vit, written out for one parameter: layer 0 for
    the embeddings, i + 1 for block i, depth + 1 for the rest; no decay on 1-D parameters and on
    pos_embed / cls_token."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        layer = 0
    elif name.startswith("blocks."):
        layer = int(name.split(".")[1]) + 1
    else:
        layer = depth + 1
    no_decay = param.ndim == 1 or name in ("cls_token", "pos_embed")
    return layer_decay ** (depth + 1 - layer), 0.0 if no_decay else weight_decay


@pytest.mark.parametrize("pooling", ["--global_pool", "--cls_token"])
def test_every_parameter_of_vit_b_gets_maes_lr_scale_and_weight_decay(pooling):
    args = parse(["--model", "vit_base_patch16_224", pooling, "--layer_decay", "0.65", "--weight_decay", "0.05",
                  "--lr", "1e-3"])
    model = create_finetune_model("vit_base_patch16_224", 1000, global_pool=args.global_pool)
    optimizer = create_optimizer(optimizer_of(args), model, torch.device("cpu"))
    names = {id(param): name for name, param in model.named_parameters()}
    ours = {names[id(param)]: (group["lr_scale"], group["weight_decay"])
            for group in optimizer.param_groups for param in group["params"]}
    expected = {name: mae_rule(name, param, 12, 0.65, 0.05) for name, param in model.named_parameters()}
    assert ours.keys() == expected.keys()
    for name, (scale, decay) in expected.items():
        assert ours[name][0] == pytest.approx(scale, rel=1e-12) and ours[name][1] == decay, name
    final_norm = "fc_norm.weight" if args.global_pool else "norm.weight"
    assert ours[final_norm] == (1.0, 0.0)  # timm's own grouping gives --cls_token's norm 0.65
