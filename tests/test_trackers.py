"""Experiment trackers: W&B in offline mode and MLflow against a real tracking server started here on
127.0.0.1 survive a kill and resume into the same runs; a server that vanishes mid-run costs one
warning and never the run; a tracker that is not installed is one ``error:`` line."""
import os
import signal
import sys
from pathlib import Path

import torch

import run_mae_pretraining
from helpers import PRETRAIN, environment, start, usage_error_of, wait_for_step

def tracked_env(tmp_path: Path, uri: str) -> dict:
    return dict(environment(tmp_path / "record"), WANDB_MODE="offline", WANDB_SILENT="true", MLFLOW_TRACKING_URI=uri,
                MLFLOW_EXPERIMENT_NAME="tests")


def checkpoint_runs(out: Path) -> dict:
    return torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)["tracker_runs"]


def test_wandb_offline_and_mlflow_survive_a_kill_and_resume_into_the_same_runs(tmp_path, mlflow_server, monkeypatch,
                                                                              capsys):
    """The killed run is a process of its own; the relaunch runs in this one."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    argv = [*PRETRAIN, "--report_to", "tensorboard", "wandb", "mlflow", "--output_dir", str(out)]
    env = tracked_env(tmp_path, mlflow_server.uri)
    process = start([sys.executable, "run_mae_pretraining.py", *argv], tmp_path / "record", env=env)
    wait_for_step(process.stdout, epoch=0, step=5, seen=[])  # after the step checkpoint of the third update
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    killed_at = checkpoint_runs(out)
    for name in ("WANDB_MODE", "WANDB_SILENT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.setenv(name, env[name])
    capsys.readouterr()
    run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(argv))
    output = "".join(capsys.readouterr())
    assert "resumed from" in output and "warning" not in output, output[-3000:]
    runs = checkpoint_runs(out)
    assert runs == killed_at and set(runs) == {"wandb", "mlflow"}
    # W&B: one offline folder per launch, both of the same run
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(folder.name.endswith(f"-{runs['wandb']}") for folder in folders), folders
    # MLflow: one run in the experiment, finished, its loss curve from before the kill and after
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name("tests")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == runs["mlflow"] and run.info.status == "FINISHED"
    steps = sorted(metric.step for metric in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps[0] == 0 and steps[-1] == 15 and len(set(steps)) == 16, steps  # 8 steps an epoch, 2 epochs
    assert run.data.params["blr"] == "0.001" and run.data.params["report_to"] == "['tensorboard', 'wandb', 'mlflow']"
    assert {"train/images_per_s", "train/data_time", "train/grad_norm", "epoch/skipped_images"} <= set(run.data.metrics)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "wandb" else real(name, *rest))
    error = usage_error_of(run_mae_pretraining, [*PRETRAIN, "--report_to", "wandb", "--output_dir", str(tmp_path / "o")],
                           capsys)
    assert error == "error: --report_to wandb: the wandb client is not installed; pip install wandb\n"
    assert not (tmp_path / "o").exists()
    error = usage_error_of(run_mae_pretraining, [*PRETRAIN, "--report_to", "none", "mlflow"], capsys)
    assert "--report_to none means no tracker" in error


def test_a_tracking_server_that_vanishes_mid_run_costs_one_warning(tmp_path, mlflow_server, monkeypatch, capsys):
    """Runs last: it stops the session's server, for real, right after the run's first curves reached it."""
    import training.trackers

    logged = training.trackers.MLflow.scalars

    def then_stop_the_server(tracker, values, step):
        logged(tracker, values, step)
        mlflow_server.stop()

    monkeypatch.setattr(training.trackers.MLflow, "scalars", then_stop_the_server)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    out = tmp_path / "out"
    run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(
        [*PRETRAIN, "--num_workers", "0", "--report_to", "mlflow", "--output_dir", str(out)]))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: the mlflow tracker failed")]
    assert len(warnings) == 1 and "the run goes on without it" in warnings[0], err[-3000:]
    assert len((out / "log.txt").read_text().splitlines()) == 2  # both epochs logged
    assert torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)["epoch"] == 1
