"""In and out of the ecosystem: Hugging Face ViTMAE both ways, non-square and non-RGB images, and the
augmentation flags for data that is not ImageNet. Tiny models, CPU."""
import ast
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import convert_checkpoint
import modeling_pretrain  # noqa: F401  (registers the pretrain_mae_* models with timm)
import run_class_finetuning
import run_knn_eval
import run_mae_pretraining
import run_mae_vis
import utils
from image_data.augmentation import Crops, pretraining_augmentation
from training.checkpoint_files import save_atomic
from training.weight_files import read_weights
from image_data.files import load_image
from helpers import TINY_MAE, TINY_VIT, WritesAFile
from modeling_finetune import create_finetune_model, load_pretrained_encoder

REPO = Path(__file__).resolve().parents[1]
TINY = "pretrain_mae_tiny_patch16_224"
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed")


def our_checkpoint(path: Path, norm_pix_loss: bool, input_size=32) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(TINY, img_size=input_size, norm_pix_loss=norm_pix_loss)
    args = {"model": TINY, "input_size": input_size, "norm_pix_loss": norm_pix_loss, "mask_ratio": 0.75,
            "in_chans": 3, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    save_atomic({"model": model.state_dict(), "epoch": 3, "args": args}, path)
    return path


def convert(source: Path, destination: Path) -> Path:
    return convert_checkpoint.main(convert_checkpoint.get_args_parser().parse_args([str(source), str(destination)]))


@needs_transformers
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_an_exported_folder_loads_into_vitmae_with_no_key_left_and_gives_our_loss(norm_pix_loss, tmp_path):
    ours = our_checkpoint(tmp_path / "ours.pth", norm_pix_loss)
    folder = convert(ours, tmp_path / "hf")
    from transformers import ViTMAEForPreTraining

    hf, info = ViTMAEForPreTraining.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (192, 12, 3)
    assert config["layer_norm_eps"] == 1e-6 and config["norm_pix_loss"] is norm_pix_loss
    assert config["mask_ratio"] == 0.75
    model = timm.create_model(TINY, img_size=32, norm_pix_loss=norm_pix_loss)
    model.load_state_dict(torch.load(ours, weights_only=True)["model"])
    torch.manual_seed(1)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 4)  # (B, C, H, W), (B, N): fixes HF's mask
    with torch.no_grad():
        output = hf.eval()(imgs, noise=noise)
        mask = output.mask.bool()  # (B, N), True = masked
        loss = model.eval().forward_loss(imgs, model(imgs, mask), mask)
    assert float(loss) == pytest.approx(float(output.loss), abs=1e-5)
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5, 0.4, 0.3] and processor["image_std"] == [0.2, 0.25, 0.3]


@needs_transformers
def test_ours_to_hugging_face_and_back_is_bitwise(tmp_path):
    ours = our_checkpoint(tmp_path / "ours.pth", norm_pix_loss=True)
    back = torch.load(convert(convert(ours, tmp_path / "hf"), tmp_path / "back.pth"), weights_only=True)
    original = torch.load(ours, weights_only=True)
    assert back["model"].keys() == original["model"].keys()
    assert all(torch.equal(back["model"][key], value) for key, value in original["model"].items())
    assert {key: back["args"][key] for key in ("model", "input_size", "norm_pix_loss", "mean", "std")} == \
        {key: original["args"][key] for key in ("model", "input_size", "norm_pix_loss", "mean", "std")}


def transformers_4_names(depth: int, decoder_depth: int) -> dict:
    """The keys of ViTMAEForPreTraining in transformers 4.x, written out from its modeling file:
    ours -> theirs, for the parts that do not split (q, k and v come from our qkv)."""
    names = {"cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
             "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
             "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
             "norm.weight": "vit.layernorm.weight", "norm.bias": "vit.layernorm.bias",
             "mask_token": "decoder.mask_token", "decoder_pos_embed": "decoder.decoder_pos_embed"}
    for part in ("decoder_embed", "decoder_norm", "decoder_pred"):
        names.update({f"{part}.{kind}": f"decoder.{part}.{kind}" for kind in ("weight", "bias")})
    for ours, theirs, count in (("blocks", "vit.encoder.layer", depth), ("decoder_blocks", "decoder.decoder_layers",
                                                                         decoder_depth)):
        for i in range(count):
            for our_part, their_part in (("attn.proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                                         ("mlp.fc2", "output.dense"), ("norm1", "layernorm_before"),
                                         ("norm2", "layernorm_after")):
                names.update({f"{ours}.{i}.{our_part}.{kind}": f"{theirs}.{i}.{their_part}.{kind}"
                              for kind in ("weight", "bias")})
    return names


@needs_transformers
@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_a_transformers_4_folder_reads_into_our_keys(weights, tmp_path):
    from safetensors.torch import save_file

    ours = torch.load(our_checkpoint(tmp_path / "ours.pth", norm_pix_loss=False), weights_only=True)["model"]
    theirs = {their: ours[our] for our, their in transformers_4_names(12, 2).items()}
    for prefix, ours_prefix, count in (("vit.encoder.layer", "blocks", 12), ("decoder.decoder_layers",
                                                                             "decoder_blocks", 2)):
        for i in range(count):
            for kind in ("weight", "bias"):
                q, k, v = ours[f"{ours_prefix}.{i}.attn.qkv.{kind}"].chunk(3)
                for name, part in (("query", q), ("key", k), ("value", v)):
                    theirs[f"{prefix}.{i}.attention.attention.{name}.{kind}"] = part.clone()
    folder = tmp_path / "hf4"
    folder.mkdir()
    config = dict(model_type="vit_mae", image_size=32, patch_size=16, num_channels=3, hidden_size=192,
                  num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, decoder_hidden_size=128,
                  decoder_num_hidden_layers=2, decoder_num_attention_heads=4, decoder_intermediate_size=512,
                  mask_ratio=0.75, norm_pix_loss=False, transformers_version="4.57.6")
    (folder / "config.json").write_text(json.dumps(config))
    if weights.endswith(".safetensors"):
        save_file(theirs, str(folder / weights))
    else:
        torch.save(theirs, folder / weights)
    read = read_weights(folder / weights)
    assert read["model"].keys() == ours.keys() and all(torch.equal(read["model"][k], v) for k, v in ours.items())
    assert read["args"]["model"] == TINY and read["args"]["input_size"] == 32


def test_a_hugging_face_folder_whose_pickle_would_run_code_is_one_error_line(tmp_path, capsys):
    evidence, folder = tmp_path / "pwned.txt", tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit_mae"}))
    torch.save({"payload": WritesAFile(str(evidence))}, folder / "pytorch_model.bin")
    argv = ["--model", "vit_tiny_patch16_224", "--input_size", "32", "--finetune", str(folder),
            "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(run_class_finetuning.main, run_class_finetuning.get_args_parser().parse_args(argv))
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("error: ") and error.count("\n") == 1
    assert "would run code" in error and "refused" in error and not evidence.exists()


@needs_transformers
def test_finetuning_from_an_exported_folder_gives_the_encoder_of_our_file(tmp_path):
    ours = our_checkpoint(tmp_path / "ours.pth", norm_pix_loss=True)
    folder = convert(ours, tmp_path / "hf")
    encoders = []
    for source in (ours, folder):
        model = create_finetune_model("vit_tiny_patch16_224", 10, img_size=32)
        load_pretrained_encoder(model, read_weights(source))
        encoders.append({key: value for key, value in model.state_dict().items() if not key.startswith("head.")})
    assert all(torch.equal(encoders[0][key], encoders[1][key]) for key in encoders[0])


@needs_transformers
@pytest.mark.parametrize("show", ["pca", "attention"])
def test_pictures_of_the_features_of_a_hugging_face_folder_are_those_of_our_file(show, pretrained_mae, tmp_path):
    """The pretrained tiny MAE and its Hugging Face conversion, read back: the same pixels."""
    folder = convert(pretrained_mae, tmp_path / "hf")
    pictures = []
    for source in (pretrained_mae, folder):
        [path] = run_mae_vis.main(run_mae_vis.get_args_parser().parse_args(
            ["synthetic", str(tmp_path / source.name), "--model_path", str(source), "--show", show, "--num_images", "4",
             "--device", "cpu"]))
        pictures.append(np.asarray(Image.open(path)))
    assert pictures[0].shape[0] > 4 * 32 and np.array_equal(pictures[0], pictures[1])


@needs_transformers
def test_pretraining_continues_from_a_hugging_face_folder(tmp_path):
    folder = convert(our_checkpoint(tmp_path / "ours.pth", norm_pix_loss=False), tmp_path / "hf")
    args = run_mae_pretraining.get_args_parser().parse_args([
        *TINY_MAE, "--num_samples", "8", "--batch_size", "4", "--epochs", "1", "--lr", "1e-12", "--warmup_epochs", "0",
        "--init_from", str(folder),
        "--output_dir", str(tmp_path / "out")])
    model = run_mae_pretraining.main(args)
    original = torch.load(tmp_path / "ours.pth", weights_only=True)["model"]
    # an lr of 1e-12 leaves the released weights (up to AdamW's first, tiny step)
    assert all(torch.allclose(model.state_dict()[key], value, atol=1e-6) for key, value in original.items())


SMALL = ["--batch_size", "4", "--epochs", "1", "--warmup_epochs", "1", "--print_freq", "100"]


def test_a_48_by_80_pretraining_and_a_finetuning_from_it_run_end_to_end(tmp_path):
    size = ["--input_size", "48", "80", "--num_samples", "8"]
    model = run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(
        [*TINY_MAE, *size, *SMALL, "--output_dir", str(tmp_path / "pre")]))
    assert model.patch_embed.grid_size == (3, 5) and model.pos_embed.shape == (1, 16, 192)
    checkpoint = torch.load(tmp_path / "pre" / "checkpoint-last.pth", weights_only=True)
    assert checkpoint["args"]["input_size"] == [48, 80]
    stats = run_class_finetuning.main(run_class_finetuning.get_args_parser().parse_args(
        [*TINY_VIT, *size, *SMALL, "--finetune", str(tmp_path / "pre" / "checkpoint-last.pth"),
         "--output_dir", str(tmp_path / "ft")]))
    assert stats["num_samples"] == 8


def npy_folder(root: Path, channels: int) -> Path:
    """Two classes of 40 x 56 arrays: uint16 (H, W) for one channel, float (C, H, W) otherwise."""
    rng = np.random.default_rng(channels)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for index in range(4):
                if channels == 1:
                    array = rng.integers(0, 65536, (40, 56), dtype=np.uint16)
                else:
                    array = rng.random((channels, 40, 56), dtype=np.float32)
                np.save(root / split / label / f"{index}.npy", array)
    return root


@pytest.mark.parametrize("channels", [1, 4])
def test_npy_folders_pretrain_finetune_and_draw_pictures(channels, tmp_path, capsys):
    data = npy_folder(tmp_path / "data", channels)
    stats = ["--mean", *["0.5"] * channels, "--std", *["0.29"] * channels]
    pre = tmp_path / "pre"
    model = run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(
        [*TINY_MAE, "--in_chans", str(channels), *stats, *SMALL,
         "--data_path", str(data / "train"), "--output_dir", str(pre)]))
    assert model.patch_embed.proj.in_channels == channels
    assert model.decoder_pred.out_features == 16 * 16 * channels
    finetuned = run_class_finetuning.main(run_class_finetuning.get_args_parser().parse_args(
        [*TINY_VIT, *SMALL, "--data_path", str(data),
         "--finetune", str(pre / "checkpoint-last.pth"), "--output_dir", str(tmp_path / "ft")]))  # its channels
    assert finetuned["num_samples"] == 8
    pictures = run_mae_vis.main(run_mae_vis.get_args_parser().parse_args(
        [str(data / "val" / "a"), str(tmp_path / "vis"), "--model_path", str(pre / "checkpoint-last.pth"),
         "--device", "cpu"]))
    with Image.open(pictures[0]) as picture:
        note = " ".join(picture.info["Description"].split())  # the caption is wrapped to the picture's width
    assert ("grayscale" if channels == 1 else "channels 1-3 of 4 shown as RGB") in note


def test_16_bit_images_keep_their_precision_until_normalization(tmp_path):
    path = tmp_path / "deep.png"
    values = np.array([[1000, 1001], [40000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    image = load_image(str(path), in_chans=1)
    assert image.shape == (1, 2, 2) and image.dtype == torch.float32
    torch.testing.assert_close(image[0], torch.from_numpy(values.astype(np.float32) / 65535), atol=0, rtol=0)
    assert image[0, 0, 0] != image[0, 0, 1]  # 8 bits would make both 3


def test_a_checkpoint_of_other_channels_is_one_error(tmp_path, capsys):
    data = npy_folder(tmp_path / "data", 4)
    pre = tmp_path / "pre"
    run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(
        [*TINY_MAE, "--in_chans", "4", "--mean", *["0.5"] * 4, "--std", *["0.3"] * 4,
         *SMALL, "--data_path", str(data / "train"), "--output_dir", str(pre)]))
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(run_class_finetuning.main, run_class_finetuning.get_args_parser().parse_args(
            [*TINY_VIT, *SMALL, "--data_path", str(data), "--in_chans",
             "3", "--finetune", str(pre / "checkpoint-last.pth"), "--output_dir", str(tmp_path / "ft")]))
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert "trained on 4 channel(s)" in error and not (tmp_path / "ft").exists()


def test_crop_scale_and_hflip_shape_the_crops_and_are_recorded(tmp_path):
    image = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8), (64, 1)))  # brighter to the right
    for hflip, flipped in ((0.0, False), (1.0, True)):
        crop, flip = pretraining_augmentation(Crops(16, (1.0, 1.0), hflip))
        for seed in range(5):
            torch.manual_seed(seed)
            pixels = np.asarray(flip(crop(image)), dtype=int)
            assert bool(pixels[:, 0].mean() > pixels[:, -1].mean()) is flipped
    args = [*TINY_MAE, "--num_samples", "8", *SMALL, "--crop_scale", "0.5", "0.9",
            "--hflip", "0", "--output_dir", str(tmp_path / "out")]
    run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(args))
    recorded = torch.load(tmp_path / "out" / "checkpoint-last.pth", weights_only=True)["args"]
    assert recorded["crop_scale"] == [0.5, 0.9] and recorded["hflip"] == 0.0


OPTIONAL = ("transformers", "safetensors")  # what only the Hugging Face border needs


def module_level_imports(path: Path) -> set:
    """The top-level packages a module imports when it is loaded (not inside its functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_without_transformers_the_rest_of_the_project_runs(tmp_path, monkeypatch):
    """Transformers is optional: no module loads it (or safetensors) on import, and pretraining,
    finetuning and k-NN run with it unimportable (an import of it would raise)."""
    modules = [*REPO.glob("*.py"), *REPO.glob("training/*.py"), *REPO.glob("image_data/*.py"),
               *REPO.glob("evaluation/*.py")]
    assert len(modules) > 30 and not [path for path in modules if module_level_imports(path) & set(OPTIONAL)]
    for name in OPTIONAL:
        monkeypatch.setitem(sys.modules, name, None)
    common = ["--num_samples", "8", "--batch_size", "4", "--epochs", "1"]
    run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(
        [*TINY_MAE, *common, "--output_dir", str(tmp_path / "pre")]))
    run_class_finetuning.main(run_class_finetuning.get_args_parser().parse_args(
        [*TINY_VIT, *common, "--finetune", str(tmp_path / "pre" / "checkpoint-last.pth"), "--output_dir",
         str(tmp_path / "ft")]))
    run_knn_eval.main(run_knn_eval.get_args_parser().parse_args(
        [*TINY_VIT, "--num_samples", "8", "--finetune", str(tmp_path / "pre" / "checkpoint-last.pth"),
         "--output_dir", str(tmp_path / "knn")]))
