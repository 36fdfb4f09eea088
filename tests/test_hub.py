"""Checkpoints by Hugging Face Hub name, offline, from a Hub cache the test fills itself in the
layout the Hub documents (``models--ORG--NAME/refs/main`` naming a snapshot folder): a
``ViTMAE`` repository and a timm ``hf-hub:`` one finetune, an unknown name is one line and exit 2."""
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
from safetensors.torch import save_file

import convert_checkpoint
import run_class_finetuning
import run_knn_eval
from helpers import TINY_VIT, usage_error_of

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FINETUNE = [*TINY_VIT, "--num_samples", "16", "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0"]


def cache_repository(cache: Path, repo_id: str, files: Path) -> None:
    """``files``' contents as the cached main revision of model repository ``repo_id``."""
    repository = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(files, repository / "snapshots" / COMMIT)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(COMMIT)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_cached_vitmae_and_a_timm_repository_finetune_offline(pretrained_mae, offline_cache, tmp_path, capsys):
    folder = tmp_path / "exported"
    convert_checkpoint.main(convert_checkpoint.get_args_parser().parse_args([str(pretrained_mae), str(folder)]))
    cache_repository(offline_cache, "ours/tiny-vit-mae", folder)
    timm_files = tmp_path / "timm"
    timm_files.mkdir()
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0)
    save_file({name: tensor.contiguous() for name, tensor in vit.state_dict().items()},
              str(timm_files / "model.safetensors"))
    (timm_files / "config.json").write_text('{"architecture": "vit_tiny_patch16_224", "num_classes": 0}')
    cache_repository(offline_cache, "ours/tiny-vit", timm_files)

    for name in ("ours/tiny-vit-mae", "hf-hub:ours/tiny-vit"):
        out = tmp_path / name.replace("/", "_").replace(":", "_")
        run_class_finetuning.main(run_class_finetuning.get_args_parser().parse_args(
            [*FINETUNE, "--finetune", name, "--output_dir", str(out)]))
        assert f"loaded the encoder of {offline_cache}" in capsys.readouterr().out
        assert (out / "checkpoint-last.pth").exists()


def test_a_name_not_in_the_cache_is_one_line(offline_cache, tmp_path, capsys):
    error = usage_error_of(run_knn_eval, [*TINY_VIT, "--finetune", "ours/nothing", "--output_dir",
                                          str(tmp_path / "out")], capsys)
    assert error.startswith("error: --finetune ours/nothing: not in the Hugging Face cache") and error.count("\n") == 1
    assert "HF_HUB_OFFLINE is set" in error and not (tmp_path / "out").exists()
