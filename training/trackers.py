"""Experiment trackers (``--report_to``): TensorBoard, Weights & Biases and MLflow, each through its own
client, behind the writer the loop and the stages already call (``add_scalar``, ``add_image``).

Only the main process logs. Each tracker gets the same scalars and the run's resolved settings;
W&B's and MLflow's run ids go into every checkpoint (``tracker_runs``), so a resumed, requeued or
restarted run logs on into the same run. Credentials, projects and servers come from each client's
own environment (``WANDB_MODE``, ``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI``, ...). A tracker that
fails, when it starts or later (a server gone, a network down), costs one warning and is dropped:
``log.txt`` and the checkpoints never depend on it.
"""
import importlib.util
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch

from utils import FAILURE_EXIT_CODE, RunFailure, UsageError, is_main_process

TRACKERS = ("tensorboard", "wandb", "mlflow", "none")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # tracker -> what pip installs
PROJECT = "mae"  # W&B project and MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say otherwise
# MLflow retries a failed request 7 times with exponential backoff (minutes); a run should not wait that long
MLFLOW_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def check_trackers(report_to: Tuple[str, ...]) -> None:
    """Refuse ``none`` beside a tracker, and a tracker whose client is not installed (with the pip line)."""
    if "none" in report_to and len(report_to) > 1:
        raise UsageError(f"--report_to none means no tracker; it cannot go with {' '.join(set(report_to) - {'none'})}")
    for name in report_to:
        if name != "none" and importlib.util.find_spec(PACKAGES[name]) is None:
            raise UsageError(f"--report_to {name}: the {name} client is not installed; pip install {PACKAGES[name]}")


@dataclass(frozen=True)
class Tracking:
    """Where a run's curves go: the trackers, TensorBoard's folder, the output folder (W&B's files,
    MLflow's default store), the run's name, and its resolved settings (logged once)."""

    report_to: Tuple[str, ...] = ("tensorboard",)
    log_dir: Optional[str] = None
    output_dir: Optional[str] = None
    run_name: Optional[str] = None
    config: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def name(self) -> str:
        return self.run_name or (Path(self.output_dir).resolve().name if self.output_dir else "mae")


class TensorBoard:
    def __init__(self, tracking: Tracking, run_id: Optional[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_id = None
        self.writer = SummaryWriter(log_dir=tracking.log_dir)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, image, step)

    def close(self) -> None:
        self.writer.close()


def step_axis(tag: str) -> str:
    """Training curves run over optimizer steps, evaluations and epoch figures over epochs."""
    return "train/step" if tag.startswith("train/") else "epoch"


class WandB:
    """A W&B run under ``OUTPUT_DIR/wandb``, resumed by id (``WANDB_MODE=offline`` keeps it local)."""

    def __init__(self, tracking: Tracking, run_id: Optional[str]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(dir=tracking.output_dir, id=run_id, resume="allow" if run_id else None,
                              project=os.environ.get("WANDB_PROJECT", PROJECT), name=tracking.name(),
                              config=dict(tracking.config))
        self.run_id = self.run.id
        for axis in ("train/step", "epoch"):
            self.run.define_metric(axis, hidden=True)
        self.run.define_metric("train/*", step_metric="train/step")
        for prefix in ("test/*", "eval/*", "epoch/*", "pictures/*"):
            self.run.define_metric(prefix, step_metric="epoch")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        first = next(iter(values))
        self.run.log({**values, step_axis(first): step})

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.run.log({f"pictures/{tag}": self.wandb.Image(chw_to_hwc(image)), "epoch": step})

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run on ``MLFLOW_TRACKING_URI`` (else a file store under the output folder),
    reopened by id."""

    def __init__(self, tracking: Tracking, run_id: Optional[str]) -> None:
        for name, value in MLFLOW_CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(tracking.output_dir or ".") / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            experiment = self.client.get_experiment_by_name(experiment_name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
            run_id = self.client.create_run(experiment_id, run_name=tracking.name()).info.run_id
            self.client.log_batch(run_id, params=mlflow_params(tracking.config))
        self.run_id = run_id

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(1000 * time.time())
        self.client.log_batch(self.run_id, metrics=[Metric(tag, float(value), now, step)
                                                    for tag, value in values.items()])

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.client.log_image(self.run_id, chw_to_hwc(image), artifact_file=f"pictures/{tag}_epoch{step:04d}.png")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_params(config: Mapping[str, Any]) -> List[Any]:
    """The settings as MLflow params (strings of at most 6000 characters)."""
    from mlflow.entities import Param

    return [Param(key, str(value)[:6000]) for key, value in config.items()]


def chw_to_hwc(image: torch.Tensor) -> np.ndarray:
    """A (C, H, W) picture as the (H, W, C) uint8 array W&B and MLflow take."""
    array = image.detach().cpu()
    if array.dtype != torch.uint8:
        array = (array.clamp(0, 1) * 255).round().to(torch.uint8)
    return array.permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Trackers:
    """The run's trackers as one writer: ``add_scalar`` and ``add_image`` go to each; a tracker
    that raises is dropped with one warning, and the run goes on."""

    def __init__(self, tracking: Tracking, run_ids: Mapping[str, str]) -> None:
        self.active: Dict[str, Any] = {}
        for name in tracking.report_to:
            if name in BACKENDS and (name != "tensorboard" or tracking.log_dir):
                self.guard(name, lambda name=name: self.active.__setitem__(
                    name, BACKENDS[name](tracking, run_ids.get(name))))

    def guard(self, name: str, call) -> None:
        try:
            call()
        except Exception as error:  # a tracker's failure must never cost the run
            self.active.pop(name, None)
            reason = " ".join(str(error).split())[:300] or type(error).__name__
            print(f"warning: the {name} tracker failed ({type(error).__name__}: {reason}); the run goes on "
                  f"without it (log.txt and the checkpoints are written as before)", file=sys.stderr, flush=True)

    def run_ids(self) -> Dict[str, str]:
        return {name: tracker.run_id for name, tracker in self.active.items() if tracker.run_id}

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        for name, tracker in list(self.active.items()):
            self.guard(name, lambda tracker=tracker: tracker.scalars(values, step))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.add_scalars({tag: value}, step)

    def add_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        for name, tracker in list(self.active.items()):
            self.guard(name, lambda tracker=tracker: tracker.image(tag, image, step))

    def close(self) -> None:
        for name, tracker in list(self.active.items()):
            self.guard(name, tracker.close)


@contextmanager
def training_writer(tracking: Tracking, run_ids: Mapping[str, str]) -> Iterator[Optional[Trackers]]:
    """The trackers of a training run on the main process (None elsewhere, or with none asked for),
    closed however the run ends; a ``RunFailure`` (a non-finite loss, a checkpoint that cannot be
    written) ends the process with exit code 1 and its message, not a traceback."""
    writer = Trackers(tracking, run_ids) if is_main_process() and "none" not in tracking.report_to else None
    try:
        yield writer
    except RunFailure as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(FAILURE_EXIT_CODE)
    finally:
        if writer is not None:
            writer.close()
