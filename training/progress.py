"""What a training epoch shows while it runs: progress lines on the main process and the trackers'
curves (``training.trackers``), with running medians and exact epoch averages (the averages go to
``log.txt``). These are the only places the loss is read back from the device."""
from collections import defaultdict, deque
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import numpy as np
import torch

from training.lr_schedule import max_lr
from utils import Timer, format_eta, get_world_size, is_main_process

GIB = 2**30

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
    """Progress lines and the trackers' curves of one epoch: the only places the loss is read back.

    Throughput and ETA count the steps this process ran, from ``start_step`` after a resume.
    """

    def __init__(self, *, epoch: int, steps: int, start_step: int, batch_size: int, log_writer: Optional[Any],
                 flops_per_sample: Optional[float] = None, peak_flops: Optional[float] = None) -> None:
        self.epoch, self.steps, self.start_step, self.batch_size = epoch, steps, start_step, batch_size
        self.log_writer = log_writer
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
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
        """A progress line on the main process and the step's scalars in the trackers: loss, lr,
        gradient norm, images/s, the wait for data, on a GPU the peak memory, and the model FLOPs
        utilisation where the device's peak is known (``training.performance.peak_flops``)."""
        self.metrics.update(grad_norm=float(grad_norm), data_time=data_time)
        if not is_main_process():
            return
        loss_value = loss.detach().item()  # the one read-back of the loss at a logging step
        elapsed = self.timer.elapsed()
        done = step + 1 - self.start_step
        images_per_s = self.batch_size * get_world_size() * done / max(elapsed, 1e-9)
        eta = format_eta(elapsed / done * (self.steps - step - 1))
        print(
            f"epoch {self.epoch} [{step + 1}/{self.steps}]  loss {loss_value:.4f}  "
            f"lr {max_lr(optimizer):.3e}  {self.metrics.line()}  {images_per_s:.1f} img/s  eta {eta}",
            flush=True,
        )
        if self.log_writer is not None:
            scalars = {"train/loss": loss_value, "train/lr": max_lr(optimizer),
                       "train/grad_norm": float(grad_norm), "train/images_per_s": images_per_s,
                       "train/data_time": data_time}
            if loss.device.type == "cuda":
                scalars["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(loss.device) / GIB
            if self.flops_per_sample and self.peak_flops:
                scalars["train/mfu"] = mfu(self.flops_per_sample, images_per_s / get_world_size(), self.peak_flops)
            self.log_writer.add_scalars(scalars, self.epoch * self.steps + step)


def mfu(flops_per_sample: float, samples_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of one device: the FLOP/s its images cost over its peak FLOP/s."""
    return flops_per_sample * samples_per_s / peak_flops

