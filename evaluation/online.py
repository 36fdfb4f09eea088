"""Watching the encoder learn while it pretrains (``run_mae_pretraining.py --eval_data_set`` or
``--eval_data_path``): every ``--eval_freq`` epochs and after the last, once the epoch's checkpoint
is written, the encoder as it stands, frozen and with every patch visible, gives the cls-token
features of both labelled splits once (each sample on one rank), and those feed the weighted k-NN
(``evaluation.knn``, ``run_knn_eval.py``'s defaults) and the sweep probe (``evaluation.linear_sweep``,
``run_linear_probe.py --protocol sweep``'s defaults), as solo-learn and lightly track a run.

It changes no weight: the model is only read, in eval mode and without gradients, the random
number generators are put back as they were, and the training loader is not touched. An error in
it is every rank's: one line on each, exit 1, the epoch's checkpoint already written.
"""
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from evaluation.features import encode_share, gather_by_index
from evaluation.knn import NB_KNN, TEMPERATURE, knn_accuracy
from evaluation.linear_sweep import sweep
from image_data.augmentation import BatchTransform
from training.settings import Settings
from utils import RunFailure, Timer, broadcast_from_main, is_main_process, raise_on_all_ranks

KNN_SHOWN = 20  # the k of knn_acc1, as DINO reports its 20-NN accuracy


@dataclass(frozen=True)
class OnlineSettings(Settings):
    """When to evaluate (``--eval_freq``, and after the last of ``--epochs``), whether to train the
    sweep probe (``--eval_probe``), and how the features are made: the batch per process, the
    loader's workers, ``--amp``, the images' mean and std, and the seed of the probe's held-out tenth."""

    eval_freq: int
    epochs: int
    batch_size: int
    amp: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    seed: int = 0
    num_workers: int = 0
    eval_probe: bool = True
    sharded: bool = False  # --fsdp: every rank runs every forward pass of the sharded encoder
    preempt_signals: Tuple[str, ...] = ("none",)


def is_due(epoch: int, settings: OnlineSettings) -> bool:
    """Every ``--eval_freq`` epochs, and after the last."""
    return (epoch + 1) % settings.eval_freq == 0 or epoch + 1 == settings.epochs


def encoder_cls(model: torch.nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """The cls token after the final norm with every patch visible: what ``run_knn_eval.py`` and the
    sweep probe read from the same weights in timm's ViT. (B, C, H, W) -> (B, D)."""
    return model.encode(imgs)[:, 0]


@contextmanager
def rngs_kept(device: torch.device) -> Iterator[None]:
    """Every generator the training draws from, as it was before: torch's (CPU and ``device``),
    numpy's and Python's."""
    python, numpy = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        yield
    random.setstate(python)
    np.random.set_state(numpy)


class OnlineEvaluation:
    """The evaluation after an epoch: ``__call__`` returns the figures its log line gains (empty
    when the epoch is not due). A collective: every rank calls it."""

    def __init__(self, train: Dataset, val: Dataset, num_classes: int, settings: OnlineSettings) -> None:
        self.train, self.val, self.num_classes, self.settings = train, val, num_classes, settings

    def __call__(self, model: torch.nn.Module, device: torch.device, epoch: int,
                 log_writer: Optional[Any] = None) -> Dict[str, float]:
        if not is_due(epoch, self.settings):
            return {}
        timer, was_training = Timer(), model.training
        with rngs_kept(device):
            figures = self.evaluate(model, device, epoch)
        model.train(was_training)
        figures["eval_s"] = timer.elapsed()
        if log_writer is not None:
            for name in ("knn_acc1", "probe_acc1"):
                if name in figures:
                    log_writer.add_scalar(f"eval/{name}", figures[name], epoch)
        if is_main_process():
            probe = f", probe top-1 {figures['probe_acc1']:.2f}%" if "probe_acc1" in figures else ""
            print(f"evaluation after epoch {epoch}: {KNN_SHOWN}-NN top-1 {figures['knn_acc1']:.2f}%{probe} "
                  f"({figures['eval_s']:.0f} s)", flush=True)
        return figures

    def evaluate(self, model: torch.nn.Module, device: torch.device, epoch: int) -> Dict[str, float]:
        """Features of both splits, then k-NN and the probe; every rank agrees on each step's outcome."""
        settings = self.settings
        batch_transform = BatchTransform(tuple(settings.mean), tuple(settings.std))
        shares, error = [], None
        try:
            for dataset in (self.train, self.val):
                shares.append(encode_share(
                    model, dataset, batch_size=settings.batch_size, num_workers=settings.num_workers, device=device,
                    amp=settings.amp, batch_transform=batch_transform, embed=encoder_cls, padded=settings.sharded,
                    stop_signals=settings.preempt_signals))
        except Exception as raised:  # noqa: BLE001 - every rank must hear of it, whatever it is
            error = failure(epoch, raised)
        raise_on_all_ranks(error)
        (train_x, train_y), (val_x, val_y) = (gather_by_index(*share, len(dataset)) for share, dataset
                                              in zip(shares, (self.train, self.val)))
        del shares
        figures, error = {}, None
        try:
            ks = sorted({min(k, len(train_x)) for k in NB_KNN})
            accuracy = knn_accuracy(train_x, train_y, val_x, val_y, self.num_classes, ks, TEMPERATURE)
            figures["knn_acc1"] = accuracy[min(KNN_SHOWN, len(train_x))]
        except Exception as raised:  # noqa: BLE001
            error = failure(epoch, raised)
        raise_on_all_ranks(error)
        if settings.eval_probe:
            try:  # the sweep agrees on its own errors: every rank raises here, or none
                chosen, _ = sweep((train_x.cpu(), train_y.cpu()), (val_x.cpu(), val_y.cpu()),
                                  num_classes=self.num_classes, seed=settings.seed)
            except Exception as raised:  # noqa: BLE001
                raise failure(epoch, raised) from raised
            figures["probe_acc1"] = chosen.val_acc1
        return broadcast_from_main(figures)  # rank 0's figures on every rank, as the loop logs them


def failure(epoch: int, error: BaseException) -> RunFailure:
    cause = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    return RunFailure(f"the evaluation after epoch {epoch} failed ({cause}); that epoch's checkpoint is written, so "
                      "the same command continues from it once the cause is fixed (or without --eval_data_set/"
                      "--eval_data_path)")

