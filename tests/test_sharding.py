"""Beyond one GPU's memory: FSDP2 against DDP, sharded checkpoints (a kill and an elastic restart,
resume on another number of processes, consolidate, refusing pickled code), layer decay on sharded
weights and the sharded evaluation. Tiny models, gloo on CPU."""
import json
import os
import pickle
import shutil
import signal
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
import run_class_finetuning
import run_knn_eval
import run_mae_pretraining
import utils
from helpers import (
    PRETRAIN,
    RECORDER,
    TINY_VIT,
    WritesAFile,
    finish,
    launched_pids,
    records,
    run_ranks,
    start,
    torchrun,
    wait_for_step,
)
from modeling_finetune import create_finetune_model, load_pretrained_encoder
from optim_factory import create_optimizer
from training.config import optimizer_of
from training.sharded_checkpoint import SafeReader
from training.sharding import shard_model

SHARDED = ["--fsdp", "--grad_checkpointing"]
# k-NN on 9 labelled images a split after each epoch: 5 on rank 0 (2 batches of 4), 4 on rank 1 (1 batch), so
# rank 1 runs a blank pass to join rank 0's second all-gather of the sharded weights
ONLINE = ["--eval_data_set", "synthetic", "--eval_num_samples", "9", "--eval_freq", "1", "--no-eval_probe"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The 2-process FSDP run (with activation checkpointing) of ``uninterrupted``'s command, with
    the evaluation during pretraining on."""
    out = tmp_path_factory.mktemp("sharded")
    outputs = run_ranks([*PRETRAIN, *SHARDED, *ONLINE, "--output_dir", str(out / "out")], out / "records",
                        script=RECORDER)
    assert [code for code, _ in outputs] == [0, 0], outputs
    return out


def test_under_fsdp_every_rank_encodes_for_the_evaluation_and_it_finds_the_scripts_knn(sharded, tmp_path):
    logged = [json.loads(line) for line in (sharded / "out" / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in logged if "knn_acc1" in line] == [0, 1]
    knn = run_knn_eval.main(run_knn_eval.get_args_parser().parse_args(
        [*TINY_VIT, "--data_set", "synthetic", "--num_samples", "9", "--finetune",
         str(sharded / "out" / "checkpoint-1-consolidated.pth"), "--output_dir", str(tmp_path)]))
    assert logged[-1]["knn_acc1"] == pytest.approx(knn["knn_acc1"]["9"], abs=0.1)


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


def test_a_worker_killed_under_an_elastic_torchrun_resumes_the_sharded_step_checkpoint_bitwise(sharded, tmp_path):
    """SIGKILL to one worker after epoch 1's step 3 is in the sharded checkpoint-last; torchrun
    (``--max-restarts 1``) starts both again, and the run goes on from that step to the end an
    uninterrupted sharded run reaches, every tensor of model and optimizer equal. The one proof
    that a kill loses nothing but the steps since the last checkpoint for sharded checkpoints and
    elastic restarts (the file checkpoints': test_robustness)."""
    out = tmp_path / "out"
    process = start(torchrun(out, SHARDED, launcher=["--max-restarts", "1"]), tmp_path / "records")
    seen = []
    wait_for_step(process.stdout, epoch=1, step=3, seen=seen)
    worker = launched_pids(process.pid)[-1]
    for pid in (worker, *launched_pids(worker)):  # and its loader worker, which holds its sockets open
        os.kill(pid, signal.SIGKILL)
    output = finish(process, seen)
    assert process.returncode == 0, output[-3000:]
    assert f"resumed from {out / 'checkpoint-last'} at epoch 1 step 3" in output, output[-3000:]
    expected, resumed = every_tensor(sharded / "out" / "checkpoint-last"), every_tensor(out / "checkpoint-last")
    assert expected.keys() == resumed.keys() and any(key.startswith("optimizer.state.") for key in expected)
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)


def test_a_sharded_checkpoint_resumes_on_one_process_and_consolidates_into_one_file(sharded, tmp_path, capsys):
    folder = sharded / "out" / "checkpoint-1"  # the last epoch's, with its consolidated file beside it
    run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(
        [*PRETRAIN, "--num_workers", "0", "--fsdp", "--epochs", "3", "--resume", str(folder), "--output_dir",
         str(tmp_path / "one")]))
    assert "resumed from" in capsys.readouterr().out and (tmp_path / "one" / "checkpoint-2-consolidated.pth").is_file()
    made = consolidate_checkpoint.main(consolidate_checkpoint.get_args_parser().parse_args(
        [str(folder), "--output", str(tmp_path / "whole.pth")]))
    whole = torch.load(made, map_location="cpu", weights_only=True)
    at_the_end = torch.load(sharded / "out" / "checkpoint-1-consolidated.pth", map_location="cpu", weights_only=True)
    assert whole["epoch"] == at_the_end["epoch"] == 1 and whole["args"]["fsdp"] is True
    assert all(torch.equal(whole["model"][key], at_the_end["model"][key]) for key in at_the_end["model"])
    timm.create_model("pretrain_mae_tiny_patch16_224", img_size=32).load_state_dict(whole["model"], strict=True)
    vit = create_finetune_model("vit_tiny_patch16_224", 10, img_size=32)
    assert load_pretrained_encoder(vit, whole) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]


def test_a_sharded_checkpoint_that_would_unpickle_code_is_refused_and_the_code_never_runs(sharded, tmp_path,
                                                                                          capsys):
    folder = tmp_path / "checkpoint-last"
    shutil.copytree(sharded / "out" / "checkpoint-1", folder)
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
    argv = [*PRETRAIN, "--num_workers", "0", "--resume", str(sharded / "out" / "checkpoint-1"),
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
        optimizer = create_optimizer(optimizer_of(args), model, torch.device("cpu"))
        return {names[id(param)]: (group["lr_scale"], group["weight_decay"])
                for group in optimizer.param_groups for param in group["params"]}

    torch.manual_seed(0)
    plain = groups(create_finetune_model("vit_tiny_patch16_224", 10, img_size=32, depth=3))
    sharded = groups(shard_model(create_finetune_model("vit_tiny_patch16_224", 10, img_size=32, depth=3),
                                 torch.device("cpu"), "none"))
    assert sharded == plain and len({scale for scale, _ in plain.values()}) == 5  # layers 0-3 and the head


def test_fsdp_finetuning_with_layer_decay_and_dist_eval_counts_each_image_once_and_keeps_the_best_as_a_link(
        tmp_path):
    """17 evaluation images on 2 processes, 4 a batch: 3 batches on rank 0, 2 on rank 1, whose
    sharded model must still join rank 0's third all-gather; every image counted once, and the
    figures those one process gets from the same weights."""
    out = tmp_path / "out"
    data = [*TINY_VIT, "--num_samples", "17", "--batch_size", "4"]
    argv = [*data, "--epochs", "1", "--layer_decay", "0.75", "--fsdp", "--grad_checkpointing", "--dist_eval",
            "--output_dir", str(out)]
    outputs = run_ranks(argv, tmp_path / "records", timeout=240, FAULT_SCRIPT="run_class_finetuning")
    assert [code for code, _ in outputs] == [0, 0] and not any("Traceback" in text for _, text in outputs), outputs
    assert "top-1" in outputs[0][1] and (out / "checkpoint-best").is_symlink() and (out / "checkpoint-0").is_dir()
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["test_num_samples"] == 17
    consolidated = out / "checkpoint-0-consolidated.pth"
    whole = torch.load(consolidated, map_location="cpu", weights_only=True)
    create_finetune_model("vit_tiny_patch16_224", 10, img_size=32).load_state_dict(whole["model"], strict=True)
    alone = run_class_finetuning.main(run_class_finetuning.get_args_parser().parse_args(
        [*data, "--eval", "--resume", str(consolidated), "--output_dir", str(tmp_path / "alone")]))
    assert alone["num_samples"] == 17
    assert record["test_acc1"] == pytest.approx(alone["acc1"]) and record["test_loss"] == pytest.approx(alone["loss"])
