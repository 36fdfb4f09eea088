"""What a training epoch shows while it runs: progress lines on the main process and TensorBoard
curves, with running medians and exact epoch averages (the averages go to ``log.txt``), and the
run's TensorBoard writer. These are the only places the loss is read back from the device."""
import sys
from collections import defaultdict, deque
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import numpy as np
import torch

from training.lr_schedule import max_lr
from utils import FAILURE_EXIT_CODE, RunFailure, Timer, format_eta, get_world_size, is_main_process

class SmoothedValue:
    """A running window for progress lines plus the exact average over everything seen."""

    def __init__(self, window: int = 20) -> None:
        self.window: deque = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.total += value * n
        self.count += n

    @property
    def median(self) -> float:
        return float(np.median(self.window)) if self.window else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)


class MetricLogger:
    """Named smoothed values and a progress line; the epoch averages go to ``log.txt``."""

    def __init__(self) -> None:
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)

    def update(self, **values: float) -> None:
        for name, value in values.items():
            self.meters[name].update(float(value))

    def line(self) -> str:
        return "  ".join(f"{name} {meter.median:.4g} ({meter.global_avg:.4g})" for name, meter in self.meters.items())

    def averages(self) -> Dict[str, float]:
        return {name: meter.global_avg for name, meter in self.meters.items()}


class Progress:
    """Progress lines and TensorBoard curves of one epoch: the only places the loss is read back.

    Throughput and ETA count the steps this process ran, from ``start_step`` after a resume.
    """

    def __init__(self, *, epoch: int, steps: int, start_step: int, batch_size: int, log_writer: Optional[Any]) -> None:
        self.epoch, self.steps, self.start_step, self.batch_size = epoch, steps, start_step, batch_size
        self.log_writer = log_writer
        self.metrics = MetricLogger()
        self.timer = Timer()

    def timed(self, loader: Iterable) -> Iterator[Tuple[Any, float]]:
        """The loader's batches, each with the seconds spent waiting for it."""
        data_start = self.timer.elapsed()
        for batch in loader:
            yield batch, self.timer.elapsed() - data_start
            data_start = self.timer.elapsed()

    def log(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, optimizer: torch.optim.Optimizer,
            data_time: float) -> None:
        """A progress line on the main process and the step's scalars in TensorBoard."""
        self.metrics.update(grad_norm=float(grad_norm), data_time=data_time)
        if is_main_process():
            elapsed = self.timer.elapsed()
            done = step + 1 - self.start_step
            images_per_s = self.batch_size * get_world_size() * done / max(elapsed, 1e-9)
            eta = format_eta(elapsed / done * (self.steps - step - 1))
            print(
                f"epoch {self.epoch} [{step + 1}/{self.steps}]  loss {loss.detach().item():.4f}  "
                f"lr {max_lr(optimizer):.3e}  {self.metrics.line()}  {images_per_s:.1f} img/s  eta {eta}",
                flush=True,
            )
        if self.log_writer is not None:
            global_step = self.epoch * self.steps + step
            self.log_writer.add_scalar("train/loss", loss.detach().item(), global_step)
            self.log_writer.add_scalar("train/lr", max_lr(optimizer), global_step)
            self.log_writer.add_scalar("train/grad_norm", float(grad_norm), global_step)


# ----------------------------------------------------------------------------- TensorBoard


def make_tensorboard_writer(log_dir: Optional[str]):
    """A TensorBoard writer on the main process when ``log_dir`` is set, else None."""
    if not log_dir or not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)


@contextmanager
def training_writer(log_dir: Optional[str]) -> Iterator[Optional[Any]]:
    """The TensorBoard writer of a training run (None off the main process), closed however the run
    ends; a ``RunFailure`` (a non-finite loss, a checkpoint that cannot be written) ends the
    process with exit code 1 and its message, not a traceback."""
    writer = make_tensorboard_writer(log_dir)
    try:
        yield writer
    except RunFailure as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(FAILURE_EXIT_CODE)
    finally:
        if writer is not None:
            writer.close()
