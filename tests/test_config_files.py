"""Config files: ``--config`` takes the flags from YAML, the command line wins, a bad file is one
``error:`` line and exit 2 before anything is written, and the ``config.yaml`` a run writes repeats
it bitwise. The paper's recipes in ``recipes/`` hold the values of the paper's tables, which are
written out below from the paper (appendix A, Tables 8 to 10), not read from our defaults."""
import pytest
import yaml

import run_class_finetuning
import run_linear_probe
import run_mae_pretraining
from helpers import REPO, assert_bitwise_equal, final_state, usage_error_of

RECIPES = REPO / "recipes"

# Table 8, pre-training setting: AdamW, base lr 1.5e-4, weight decay 0.05, betas 0.9 and 0.95, batch
# 4096, cosine decay, 40 warmup epochs, RandomResizedCrop; mask ratio 75% (Section 4); 1600 epochs
# for Table 3's models
PRETRAINING = {"opt": "adamw", "blr": 1.5e-4, "weight_decay": 0.05, "opt_betas": [0.9, 0.95], "warmup_epochs": 40,
               "mask_ratio": 0.75, "epochs": 1600}
# Table 9, end-to-end fine-tuning: AdamW, base lr 1e-3, weight decay 0.05, betas 0.9 and 0.999,
# layer-wise lr decay 0.75, batch 1024, 5 warmup epochs, RandAug (9, 0.5), label smoothing 0.1,
# mixup 0.8, cutmix 1.0; 100 epochs (B) or 50 (L/H), drop path 0.1 (B/L) or 0.2 (H)
FINETUNING = {"opt": "adamw", "blr": 1e-3, "weight_decay": 0.05, "opt_betas": [0.9, 0.999], "layer_decay": 0.75,
              "warmup_epochs": 5, "aa": "rand-m9-mstd0.5-inc1", "smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0}
FINETUNING_BY_MODEL = {"base": {"epochs": 100, "drop_path": 0.1}, "large": {"epochs": 50, "drop_path": 0.1},
                       "huge": {"epochs": 50, "drop_path": 0.2}}
# Table 10, linear probing: LARS (our probe's optimizer), base lr 0.1, weight decay 0, batch 16384,
# 10 warmup epochs, 90 epochs; the cls token (appendix A.2)
PROBING = {"protocol": "mae", "blr": 0.1, "weight_decay": 0.0, "warmup_epochs": 10, "epochs": 90,
           "global_pool": False}


def parsed(module, recipe: str, *flags: str):
    return module.get_args_parser().parse_args(["--config", str(RECIPES / recipe), *flags])


def effective_batch(args, gpus: int) -> int:
    return args.batch_size * args.accum_iter * gpus


def assert_holds(args, expected: dict) -> None:
    for flag, value in expected.items():
        assert getattr(args, flag) == (pytest.approx(value) if isinstance(value, float) else value), flag


@pytest.mark.parametrize("size", ["base", "large", "huge"])
def test_the_paper_recipes_hold_its_tables(size):
    pretraining = parsed(run_mae_pretraining, f"pretrain_vit_{size}.yaml")
    assert_holds(pretraining, PRETRAINING)
    assert pretraining.norm_pix_loss and effective_batch(pretraining, gpus=8) == 4096
    assert size in pretraining.model
    finetuning = parsed(run_class_finetuning, f"finetune_vit_{size}.yaml")
    assert_holds(finetuning, {**FINETUNING, **FINETUNING_BY_MODEL[size]})
    assert effective_batch(finetuning, gpus=8) == 1024 and size in finetuning.model


def test_the_probe_and_2b_recipes_hold_the_paper_tables():
    probing = parsed(run_linear_probe, "linprobe_vit_base.yaml")
    assert_holds(probing, PROBING)
    assert effective_batch(probing, gpus=8) == 16384
    two_b = parsed(run_mae_pretraining, "pretrain_vit_2b_fsdp.yaml")
    assert_holds(two_b, PRETRAINING)
    assert two_b.fsdp and two_b.grad_checkpointing and effective_batch(two_b, gpus=4 * 8) == 4096


def test_every_recipe_parses_and_the_command_line_wins():
    scripts = {"finetune": run_class_finetuning, "linprobe": run_linear_probe}
    for recipe in sorted(RECIPES.glob("*.yaml")):
        module = scripts.get(recipe.name.split("_")[0], run_mae_pretraining)
        args = module.get_args_parser().parse_args(["--config", str(recipe), "--epochs", "3", "--no-pin_mem"])
        assert args.epochs == 3 and args.pin_mem is False, recipe.name
        keys = yaml.safe_load(recipe.read_text())
        assert all(getattr(args, key) == value or key in ("epochs", "input_size") for key, value in keys.items())


@pytest.mark.parametrize("text, words", [
    ("mask_ratoi: 0.5\n", "unknown key 'mask_ratoi'; did you mean mask_ratio?"),
    ("batch_size: 1.5\n", "batch_size: 1.5 is not a valid int"),
    ("mask_ratio: 1.5\n", "--mask_ratio must be in [0, 1), got 1.5"),
    ("amp: fp8\n", "amp: must be one of bf16, fp16, none; got 'fp8'"),
    ("norm_pix_loss: 1\n", "norm_pix_loss: takes true or false, got 1"),
    ("crop_scale: [0.2]\n", "crop_scale: takes 2 values, got 1"),
    ("epochs: null\n", "epochs: takes a value (default 400), got null"),
    ("- epochs\n", "must map flag names to values, not hold a list"),
    ("epochs: [\n", "is not valid YAML"),
])
def test_a_bad_file_is_one_line_naming_the_key_and_the_file(tmp_path, capsys, text, words):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        run_mae_pretraining.get_args_parser().parse_args(["--config", str(config)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --config {config}") and words in lines[0], lines


def test_a_bad_file_stops_the_script_before_anything_is_written(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 1\nblr: -1\n")
    out = tmp_path / "out"
    error = usage_error_of(run_mae_pretraining, ["--config", str(config), "--output_dir", str(out)], capsys)
    assert error == f"error: --config {config}: --blr must be positive, got -1.0\n"
    assert not out.exists()


def test_the_paper_recipe_overridden_runs_and_its_config_yaml_repeats_it_bitwise(tmp_path):
    """The ViT-B recipe, shrunk on the command line to a tiny model; the run's own config.yaml then
    repeats it in another folder, with the same weights and optimizer state to the bit."""
    shrink = ["--model", "pretrain_mae_tiny_patch16_224", "--input_size", "32", "--patch_size", "8", "--num_samples",
              "32", "--batch_size", "8", "--accum_iter", "2", "--epochs", "2", "--warmup_epochs", "1",
              "--num_workers", "0", "--device", "cpu"]
    first, second = tmp_path / "first", tmp_path / "second"
    run_mae_pretraining.main(parsed(run_mae_pretraining, "pretrain_vit_base.yaml", *shrink, "--output_dir",
                                    str(first)))
    written = yaml.safe_load((first / "config.yaml").read_text())
    assert written["blr"] == 1.5e-4 and written["opt_betas"] == [0.9, 0.95] and written["epochs"] == 2
    assert written["model"] == "pretrain_mae_tiny_patch16_224" and written["norm_pix_loss"] is True
    assert "lr" not in written and "# lr: " in (first / "config.yaml").read_text()  # derived from blr: a comment
    assert written["data_set"] == "synthetic" and written["amp"] == "none"  # resolved defaults are values
    run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(
        ["--config", str(first / "config.yaml"), "--output_dir", str(second)]))
    for a, b in zip(final_state(first), final_state(second)):
        assert_bitwise_equal(a, b)
