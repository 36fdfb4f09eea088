"""Beyond one GPU's memory: FSDP2 against DDP, sharded checkpoints (resume, reshard, consolidate,
refusing pickled code) and layer decay on sharded weights. Tiny models, gloo on CPU."""
import json
import os
import pickle
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Dict

import pytest
import timm
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import consolidate_checkpoint
import modeling_pretrain  # noqa: F401  (registers the pretrain_mae_* models with timm)
import run_mae_pretraining
import utils
from helpers import PRETRAIN, REPO, WritesAFile, finish, free_port, records, run, start, torchrun, wait_for_step
from modeling_finetune import create_finetune_model, load_pretrained_encoder
from optim_factory import create_optimizer
from training.sharded_checkpoint import SafeReader
from training.sharding import shard_model

SHARDED = ["--fsdp", "--grad_checkpointing"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The 2-process FSDP run (with activation checkpointing) of ``uninterrupted``'s command."""
    out = tmp_path_factory.mktemp("sharded")
    run(torchrun(out / "out", SHARDED), out / "records")
    return out


def test_fsdp_trains_as_ddp_does_to_1e_5(uninterrupted, sharded):
    """The same losses, and the same global gradient norm (what --clip_grad 0.5 clips) over shards."""
    for rank in (0, 1):
        ddp, fsdp = records(uninterrupted / "records", rank)[:5], records(sharded / "records", rank)[:5]
        assert [step["keys"] for step in fsdp] == [step["keys"] for step in ddp]
        assert [step["loss"] for step in fsdp] == pytest.approx([step["loss"] for step in ddp], abs=1e-5, rel=0)
    ddp, fsdp = (json.loads((run / "out" / "log.txt").read_text().splitlines()[0]) for run in (uninterrupted, sharded))
    assert fsdp["train_grad_norm"] == pytest.approx(ddp["train_grad_norm"], rel=1e-5)
    assert ddp["train_grad_norm"] > 0.5  # the norms before clipping: the steps were clipped


def every_tensor(folder: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a sharded checkpoint (model and optimizer), whole, read in this process."""
    metadata = SafeReader(folder).read_metadata()
    state = {key: torch.empty(item.size, dtype=item.properties.dtype)
             for key, item in metadata.state_dict_metadata.items() if isinstance(item, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, on purpose
        dcp.load(state, checkpoint_id=folder, storage_reader=SafeReader(folder), no_dist=True)
    return state


def test_a_sharded_run_killed_after_a_step_checkpoint_resumes_bitwise_equal(sharded, tmp_path):
    out = tmp_path / "out"
    process = start(torchrun(out, SHARDED), tmp_path / "records")
    seen = []
    wait_for_step(process, epoch=1, step=3, seen=seen)  # update 3 of epoch 1 is in checkpoint-last
    for task in Path(f"/proc/{process.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
    finish(process, seen)
    output = run(torchrun(out, SHARDED), tmp_path / "records")
    assert f"resumed from {out / 'checkpoint-last'} at epoch 1 step 3" in output
    expected, resumed = every_tensor(sharded / "out" / "checkpoint-last"), every_tensor(out / "checkpoint-last")
    assert expected.keys() == resumed.keys() and any(key.startswith("optimizer.state.") for key in expected)
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)


def test_a_sharded_checkpoint_resumes_on_one_process_and_consolidates_into_one_file(sharded, tmp_path):
    folder = sharded / "out" / "checkpoint-2"  # the last epoch's, with its consolidated file beside it
    output = run([sys.executable, str(REPO / "tests" / "pretrain_record_samples.py"), *PRETRAIN,
                  "--fsdp", "--epochs", "4", "--resume", str(folder), "--output_dir", str(tmp_path / "one")],
                 tmp_path / "records")
    assert "resumed from" in output and (tmp_path / "one" / "checkpoint-3-consolidated.pth").is_file()
    made = consolidate_checkpoint.main(consolidate_checkpoint.get_args_parser().parse_args(
        [str(folder), "--output", str(tmp_path / "whole.pth")]))
    whole = torch.load(made, map_location="cpu", weights_only=True)
    at_the_end = torch.load(sharded / "out" / "checkpoint-2-consolidated.pth", map_location="cpu", weights_only=True)
    assert whole["epoch"] == at_the_end["epoch"] == 2 and whole["args"]["fsdp"] is True
    assert all(torch.equal(whole["model"][key], at_the_end["model"][key]) for key in at_the_end["model"])
    timm.create_model("pretrain_mae_tiny_patch16_224", img_size=32).load_state_dict(whole["model"], strict=True)
    vit = create_finetune_model("vit_tiny_patch16_224", 10, img_size=32)
    assert load_pretrained_encoder(vit, whole) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]


def test_a_sharded_checkpoint_that_would_unpickle_code_is_refused_and_the_code_never_runs(sharded, tmp_path,
                                                                                          capsys):
    folder = tmp_path / "checkpoint-last"
    shutil.copytree(sharded / "out" / "checkpoint-2", folder)
    evidence = tmp_path / "pwned.txt"
    (folder / ".metadata").write_bytes(pickle.dumps(WritesAFile(str(evidence))))
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(consolidate_checkpoint.main,
                                  consolidate_checkpoint.get_args_parser().parse_args([str(folder)]))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "would run code" in error and "open is not part of DCP's metadata" in error
    assert not evidence.exists()


@pytest.mark.parametrize("extra, message", [
    (["--amp", "fp16"], "--fsdp runs with --amp bf16 or none"),
    (["--resume", "{file}"], "is one file, and --fsdp resumes the folders it writes"),
])
def test_bad_sharded_command_lines_exit_2(extra, message, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"model": timm.create_model("pretrain_mae_tiny_patch16_224", img_size=32).state_dict()}, checkpoint)
    argv = [*PRETRAIN, "--num_workers", "0", "--fsdp", *[str(checkpoint) if item == "{file}" else item
                                                               for item in extra], "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(run_mae_pretraining.main, run_mae_pretraining.get_args_parser().parse_args(argv))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_folder_checkpoint_without_fsdp_exits_2(sharded, tmp_path, capsys):
    argv = [*PRETRAIN, "--num_workers", "0", "--resume", str(sharded / "out" / "checkpoint-2"),
            "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_usage_error(run_mae_pretraining.main, run_mae_pretraining.get_args_parser().parse_args(argv))
    assert exit_info.value.code == 2 and "is a sharded folder: resume it with --fsdp" in capsys.readouterr().err


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def test_sharded_weights_keep_maes_layer_decay_and_weight_decay_groups(one_process_group):
    """The same scale and decay for every parameter, by name, as the unsharded model's optimizer."""
    args = run_mae_pretraining.get_args_parser().parse_args(["--lr", "1e-3", "--weight_decay", "0.05"])
    args.layer_decay = 0.75

    def groups(model: torch.nn.Module) -> Dict[str, tuple]:
        names = {id(param): name for name, param in model.named_parameters()}
        optimizer = create_optimizer(args, model, torch.device("cpu"))
        return {names[id(param)]: (group["lr_scale"], group["weight_decay"])
                for group in optimizer.param_groups for param in group["params"]}

    torch.manual_seed(0)
    plain = groups(create_finetune_model("vit_tiny_patch16_224", 10, img_size=32, depth=3))
    sharded = groups(shard_model(create_finetune_model("vit_tiny_patch16_224", 10, img_size=32, depth=3),
                                 torch.device("cpu"), "none"))
    assert sharded == plain and len({scale for scale, _ in plain.values()}) == 5  # layers 0-3 and the head


def test_fsdp_finetuning_with_layer_decay_trains_and_keeps_the_best_as_a_link(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
               str(REPO / "run_class_finetuning.py"), "--model", "vit_tiny_patch16_224", "--input_size", "32",
               "--num_samples", "16", "--batch_size", "4", "--epochs", "1", "--num_workers", "0", "--device", "cpu",
               "--layer_decay", "0.75", "--fsdp", "--grad_checkpointing", "--output_dir", str(out)]
    output = run(command, tmp_path / "records")
    assert "top-1" in output and (out / "checkpoint-best").is_symlink() and (out / "checkpoint-0").is_dir()
    whole = torch.load(out / "checkpoint-0-consolidated.pth", map_location="cpu", weights_only=True)
    create_finetune_model("vit_tiny_patch16_224", 10, img_size=32).load_state_dict(whole["model"], strict=True)
