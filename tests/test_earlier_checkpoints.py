"""Checkpoints written by earlier versions resume here. The format is written down as it was at
dfbc291 (the version before the settings were typed): the keys of an epoch's and a step's
``checkpoint-last.pth`` and the flat ``args`` dict that version stored for the command below, value by
value. A checkpoint in that format, holding this run's tensors, must resume and end bitwise where the
uninterrupted run ends; and this version must still write the same keys, and every ``args`` entry
that version wrote, with its value (flags added since join them)."""
import io
from pathlib import Path
from typing import Dict, List

import pytest
import torch

import run_class_finetuning
import run_mae_pretraining
import training.checkpoint
from helpers import TINY_MAE, TINY_VIT, assert_bitwise_equal, final_state

# 16 images, 4 a step: 4 steps an epoch, a step checkpoint after the second of each
COMMON = ["--num_samples", "16", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--blr", "1e-3",
          "--save_ckpt_steps", "2", "--print_freq", "1000"]
EPOCH_KEYS = {"model", "optimizer", "scaler", "epoch", "args"}
STEP_KEYS = {"step", "samples_done", "samples_per_epoch", "loss_sums", "losses_counted"}  # the position in the epoch
SHARED_ARGS = {  # what dfbc291 stored for both stages' commands here, besides OUT in output_dir and log_dir
    "batch_size": 4, "epochs": 2, "accum_iter": 1, "input_size": 32, "patch_size": None, "opt": "adamw",
    "opt_eps": 1e-08, "momentum": 0.9, "weight_decay": 0.05, "lr": 1.5625e-05, "blr": 0.001, "warmup_epochs": 1.0,
    "clip_grad": None, "hflip": 0.5, "num_samples": 16, "in_chans": 3, "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225], "num_workers": 0, "max_image_pixels": 178956970, "pin_mem": True, "data_path": None,
    "data_set": "synthetic", "shuffle_window": 16, "fsdp": False, "grad_checkpointing": False, "output_dir": "OUT",
    "log_dir": "OUT/tensorboard", "device": "cpu", "amp": "none", "local_rank": 0, "dist_timeout": None,
    "compile": False, "seed": 0, "resume": "", "auto_resume": True, "start_epoch": 0, "save_ckpt_freq": 20,
    "save_ckpt_steps": 2, "print_freq": 1000, "preempt_signals": ["TERM", "USR1"], "requeue": False, "rank": 0,
    "world_size": 1, "distributed": False, "eff_batch_size": 4,
}
PRETRAINING_ARGS = {
    **SHARED_ARGS, "model": "pretrain_mae_tiny_patch16_224", "mask_ratio": 0.75, "norm_pix_loss": False,
    "drop_path": 0.0, "init_from": "", "crop_scale": [0.2, 1.0], "opt_betas": [0.9, 0.95], "min_lr": 0.0,
    "decoder": "pil",
}
FINETUNING_ARGS = {
    **SHARED_ARGS, "model": "vit_tiny_patch16_224", "global_pool": True, "nb_classes": 10, "finetune": "",
    "drop_path": 0.1, "opt_betas": [0.9, 0.999], "layer_decay": 0.75, "min_lr": 1e-06, "color_jitter": None,
    "aa": "rand-m9-mstd0.5-inc1", "smoothing": 0.1, "reprob": 0.25, "remode": "pixel", "recount": 1, "mixup": 0.0,
    "cutmix": 0.0, "cutmix_minmax": None, "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "mixup_mode": "batch",
    "crop_scale": [0.08, 1.0], "eval_data_path": None, "eval": False, "dist_eval": False, "shards": False,
}
STAGES = {
    "pretraining": (run_mae_pretraining, [*TINY_MAE, *COMMON], PRETRAINING_ARGS),
    "finetuning": (run_class_finetuning, [*TINY_VIT, *COMMON], FINETUNING_ARGS),
}


def as_written(args: Dict, out: Path) -> Dict:
    return {key: str(out) + value[3:] if isinstance(value, str) and value.startswith("OUT") else value
            for key, value in args.items()}


def run_recording(stage, argv: List[str], out: Path, monkeypatch) -> List[Dict]:
    """Run the stage to the end, keeping a copy of every ``checkpoint-last.pth`` it wrote."""
    written, save_files = [], training.checkpoint.save_files

    def keep(payload, paths):
        error = save_files(payload, paths)
        if any(Path(path).name == training.checkpoint.LAST for path in paths):
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            written.append(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
        return error

    monkeypatch.setattr(training.checkpoint, "save_files", keep)
    stage.main(stage.get_args_parser().parse_args([*argv, "--output_dir", str(out)]))
    monkeypatch.undo()
    return written


NEW_KEYS = {"tracker_runs"}  # written since dfbc291: the trackers' run ids ({} with TensorBoard alone)


@pytest.mark.parametrize("stage_name", sorted(STAGES))
def test_checkpoints_in_the_format_of_dfbc291_resume_and_end_where_an_uninterrupted_run_ends(
        stage_name, tmp_path, monkeypatch, capsys):
    stage, argv, old_args = STAGES[stage_name]
    straight = tmp_path / "straight"
    written = run_recording(stage, argv, straight, monkeypatch)
    extra = {"max_accuracy"} if stage is run_class_finetuning else set()
    by_place = {(payload["epoch"], payload.get("step")): payload for payload in written}
    for payload in written:  # this version writes what dfbc291 wrote, and new keys and flags beside it
        expected_keys = EPOCH_KEYS | extra | NEW_KEYS | (STEP_KEYS if "step" in payload else set())
        assert set(payload) == expected_keys
        assert as_written(old_args, straight).items() <= payload["args"].items()
    for place, epoch_line in (((0, None), "at epoch 1"), ((1, 2), "at epoch 1 step 2")):
        payload, out = by_place[place], tmp_path / f"resumed_{place[0]}_{place[1]}"
        old = {key: payload[key] for key in EPOCH_KEYS | extra | (STEP_KEYS if place[1] else set())}
        old["args"] = as_written(old_args, out)
        out.mkdir()
        torch.save(old, out / "checkpoint-last.pth")
        capsys.readouterr()
        stage.main(stage.get_args_parser().parse_args([*argv, "--output_dir", str(out)]))
        output = capsys.readouterr().out
        assert f"resumed from {out / 'checkpoint-last.pth'} {epoch_line}\n" in output, output[-2000:]
        for ours, theirs in zip(final_state(straight), final_state(out)):
            assert_bitwise_equal(ours, theirs)
