"""The one loop every stage trains with, read top to bottom from ``fit``: resuming, starting each
epoch's data where it stands (the loader's ``start_epoch``), ``train_epoch`` (the learning rate of
``training.lr_schedule``, gradient accumulation and sync, the optimizer step, the non-finite loss
watch, the progress lines of ``training.progress``, which steps log and which save, the stop after
a preemption signal), then the epoch's evaluation, checkpoints and log line.

A stage gives ``fit`` a ``Stage``: its loss, its evaluation if it has one (which says what its
best is and how it reads: ``Evaluation``), and what it does once an epoch is saved
(``engine_for_pretraining``, ``engine_for_finetuning``); the loop does the rest, the same way for
every stage, and knows no task. What it reads is ``TrainingSettings``: each part's own settings
(the schedule, ``Stepping``, checkpointing, resuming, stopping), which it hands on to that part.
"""
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, Mapping, Optional, Protocol

import torch
from torch.distributed.tensor import DTensor

from training.checkpoint import (
    BEST,
    Checkpointing,
    StepSaver,
    TrainingState,
    save_epoch,
    save_training_state,
    step_saver,
)
from training.config_file import write_config
from training.epoch_position import EpochStart, epoch_start
from training.lr_schedule import Schedule, lr_at, max_lr, set_learning_rate
from training.nonfinite import FP16_NONFINITE_PATIENCE, NonFiniteWatch
from training.performance import peak_flops
from training.precision import autocast
from training.preemption import Preempted, PreemptionWatch, Stopping, preemptible
from training.progress import Progress
from training.resume import Resuming, resume_training_state
from training.settings import Settings
from training.trackers import Tracking, training_writer
from training.wrapping import unwrap_model
from utils import (
    Timer,
    all_gather_floats,
    all_reduce_sum,
    append_log,
    barrier,
    broadcast_from_main,
    format_eta,
    get_world_size,
    is_main_process,
    seed_everything,
)

LossFn = Callable[[Any], torch.Tensor]

# ----------------------------------------------------------------------------- the epochs


class Evaluation(Protocol):
    """A stage's evaluation after each epoch, and what it calls the best (``checkpoint-best.pth``)."""

    def __call__(self) -> Dict[str, float]:
        """The epoch's figures (a collective where the evaluation is)."""

    def start(self, resumed: Mapping[str, Any]) -> None:
        """Take up the best so far from the checkpoint the run resumed (empty when fresh)."""

    def judge(self, stats: Mapping[str, float]) -> bool:
        """Note an epoch's figures; whether they are the best so far."""

    def kept(self) -> Dict[str, Any]:
        """What every checkpoint and log line keeps of the best so far."""

    def describe(self, stats: Mapping[str, float]) -> str:
        """One line saying how the model did."""


class EpochLoader(Protocol):
    """What the loop asks of a training loader (``datasets.EpochLoader``) besides its batches."""

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...

    def start_epoch(self, epoch: int, samples_done: int = 0) -> None:
        """Serve ``epoch`` from ``samples_done`` positions of its order on, and count its unreadable images."""

    def skipped_images(self, device: torch.device) -> int:
        """The epoch's unreadable images over all ranks (a collective)."""


@dataclass(frozen=True)
class Stepping(Settings):
    """What each micro-step reads: the batch per process, how many micro-steps make an update,
    the seeds, the precision, clipping, and which steps print a line or save a step checkpoint."""

    batch_size: int
    accum_iter: int
    seed: int
    rank: int
    amp: str
    clip_grad: Optional[float] = None
    print_freq: int = 20
    save_ckpt_steps: int = 0


@dataclass(frozen=True)
class TrainingSettings:
    """What ``fit`` reads: each part's own settings, handed on to the part, and the trackers'."""

    schedule: Schedule
    stepping: Stepping
    checkpointing: Checkpointing
    resuming: Resuming
    stopping: Stopping
    tracking: Tracking = Tracking()


@dataclass(frozen=True)
class Stage:
    """What a stage brings to the loop; everything else is the loop's, the same for every stage."""

    loss_fn: LossFn  # a loader batch -> the loss to minimize
    evaluate: Optional[Evaluation] = None  # after each epoch
    # (epoch, TensorBoard writer) -> figures for the epoch's log line, once the epoch is saved
    after_epoch: Optional[Callable[[int, Optional[Any]], Optional[Mapping[str, float]]]] = None
    flops_per_sample: Optional[float] = None  # a training step's FLOPs per image (training.flops), for the MFU


def fit(state: TrainingState, stage: Stage, *, loader: EpochLoader, device: torch.device,
        settings: TrainingSettings) -> Dict[str, float]:
    """Train from where the run resumes to ``--epochs``; returns the last evaluation (if any). A
    collective: every rank calls it.

    Each epoch: start the loader (part-way in after a step checkpoint), ``train_epoch``, the
    stage's evaluation, ``checkpoint-last.pth`` (and the numbered and best ones), the stage's
    ``after_epoch``, and one JSON line in ``log.txt``. A non-finite loss exits 1, a preemption
    signal 128 + its number once the step is saved.
    """
    resume = resume_training_state(state, settings.resuming)
    write_config(settings.checkpointing.output_dir, settings.checkpointing.config_yaml)  # inputs known good
    epochs, output_dir = settings.schedule.epochs, settings.checkpointing.output_dir
    evaluation = stage.evaluate
    if evaluation:
        evaluation.start(resume.checkpoint)

    def kept() -> Dict[str, Any]:  # what every checkpoint keeps of the evaluation's best
        return evaluation.kept() if evaluation else {}

    timer = Timer()
    n_parameters = sum(p.numel() for p in state.model.parameters())
    test_stats: Dict[str, float] = {}
    with preemptible(settings.stopping) as preemption, training_writer(
            settings.tracking, resume.checkpoint.get("tracker_runs", {})) as log_writer:
        # every checkpoint keeps the trackers' run ids (rank 0's), so a resumed run logs on into the same runs
        tracker_runs = broadcast_from_main(log_writer.run_ids() if log_writer else {})
        for epoch in range(resume.epoch, epochs):
            start = epoch_start(resume.checkpoint, epoch)
            loader.start_epoch(epoch, start.samples_done)
            train_stats = train_epoch(state, loader, stage.loss_fn, device=device, epoch=epoch, stepping=settings.stepping,
                                      schedule=settings.schedule, log_writer=log_writer, start=start,
                                      preemption=preemption, flops_per_sample=stage.flops_per_sample,
                                      save_step=step_saver(state, epoch=epoch, checkpointing=settings.checkpointing,
                                                           tracker_runs=tracker_runs, **kept()))
            record = {f"train_{key}": value for key, value in train_stats.items()}
            best = False
            if evaluation:
                # rank 0's figures on every rank: each rank then takes the same save decisions below, which
                # are collectives, even where unreduced evaluations differ in the last bit between devices
                test_stats = broadcast_from_main(evaluation())
                best = evaluation.judge(test_stats)
                record.update({f"test_{key}": value for key, value in test_stats.items()})
            save_epoch(state, epoch=epoch, checkpointing=settings.checkpointing, tracker_runs=tracker_runs, **kept())
            if best and output_dir:
                save_training_state(state, Path(output_dir), [BEST], epoch=epoch,
                                    record=settings.checkpointing.record, tracker_runs=tracker_runs, **kept())
            if stage.after_epoch:
                record.update(stage.after_epoch(epoch, log_writer) or {})
            record.update(epoch=epoch, **kept(), n_parameters=n_parameters,
                          skipped_images=loader.skipped_images(device))
            log_epoch(record, test_stats, log_writer, output_dir, evaluation)
    if evaluation and not test_stats:  # resumed a finished run: report where it ended rather than nothing
        test_stats = evaluation()
        if is_main_process():
            print(f"nothing left to train (epoch {resume.epoch} of {epochs}); the resumed model: "
                  f"{evaluation.describe(test_stats)}")
    if is_main_process():
        print(f"training time {format_eta(timer.elapsed())}")
    return test_stats


def log_epoch(record: Dict[str, Any], test_stats: Mapping[str, float], log_writer: Optional[Any],
              output_dir: Optional[str], evaluation: Optional[Evaluation]) -> None:
    """The epoch's line in ``log.txt`` and on the console, the evaluation's own line, and in the
    trackers its figures (the fractional ones; counts are no curves) and the unreadable images."""
    append_log(output_dir, record)
    if log_writer is not None:
        figures = {f"test/{key}": value for key, value in test_stats.items() if isinstance(value, float)}
        log_writer.add_scalars({**figures, "epoch/skipped_images": record["skipped_images"]}, record["epoch"])
    if is_main_process():
        print(json.dumps(record), flush=True)
        if evaluation:
            print(evaluation.describe(test_stats))


# ----------------------------------------------------------------------------- one epoch


def train_epoch(
    state: TrainingState,
    loader: Iterable,
    loss_fn: LossFn,
    *,
    device: torch.device,
    epoch: int,
    stepping: Stepping,
    schedule: Schedule,
    log_writer: Optional[Any] = None,
    start: EpochStart = EpochStart(),
    save_step: Optional[StepSaver] = None,
    preemption: Optional[PreemptionWatch] = None,
    flops_per_sample: Optional[float] = None,
) -> Dict[str, float]:
    """One epoch of any stage: ``loss_fn(batch)`` gives the loss, this does the rest (a collective,
    on every rank).

    Per micro-step: RNGs seeded from (seed, rank, epoch, step), lr from the fractional epoch,
    forward under autocast, backward (no DDP all-reduce until the last micro-step), optimizer
    step; every ``--save_ckpt_steps`` updates a step checkpoint (``save_step``), and after an
    update at which the ranks agree that a preemption signal arrived, a step checkpoint and then
    ``Preempted``. A resumed epoch begins at ``start``, so it ends as an uninterrupted one. Returns
    the epoch's averages, the loss averaged over all ranks' micro-steps.
    """
    model, optimizer, scaler = state.model, state.optimizer, state.scaler
    model.train()
    steps = len(loader)  # a whole epoch's micro-steps at this world size
    world_size = get_world_size()
    global_batch = stepping.batch_size * world_size
    samples_per_epoch = start.samples_per_epoch or steps * global_batch
    first_step = start.samples_done // global_batch
    progress = Progress(epoch=epoch, steps=steps, start_step=first_step, batch_size=stepping.batch_size,
                        log_writer=log_writer, flops_per_sample=flops_per_sample,
                        peak_flops=peak_flops(device, stepping.amp))
    watch = NonFiniteWatch(device, FP16_NONFINITE_PATIENCE if scaler.is_enabled() else 1)
    loss_total = torch.tensor(start.loss_sum_of(stepping.rank, world_size), dtype=torch.float64, device=device)
    grad_norm = torch.zeros((), device=device)
    ran, saved = 0, None
    optimizer.zero_grad(set_to_none=True)
    for ran, (batch, data_time) in enumerate(progress.timed(loader), start=1):
        step = first_step + ran - 1
        seed_everything(stepping.seed, stepping.rank, epoch, step)
        update = ran % stepping.accum_iter == 0
        if (ran - 1) % stepping.accum_iter == 0:
            position = start.samples_done + (ran - 1) * global_batch
            set_learning_rate(optimizer, lr_at(epoch + position / samples_per_epoch, schedule))
        with grad_sync(model, update):
            with autocast(device, stepping.amp):
                loss = loss_fn(batch)
            scaler.scale(loss / stepping.accum_iter).backward()
        stop = 0
        if update:
            norm = optimizer_step(state, stepping.clip_grad, measure_norm=norm_is_read(step, steps, stepping))
            grad_norm = grad_norm if norm is None else norm
            stop = preemption.agreed() if preemption is not None else 0
        watch.observe(loss, step)
        loss_total += loss.detach()
        if save_step is not None and saves_a_step_checkpoint(step, steps, update=update, stop=stop,
                                                                 stepping=stepping):
            watch.raise_if_bad_on_any_rank(epoch, steps, schedule, scaler)  # a bad loss never reaches a checkpoint
            done = EpochStart(samples_done=start.samples_done + ran * global_batch,
                              samples_per_epoch=samples_per_epoch, loss_sums=tuple(all_gather_floats(loss_total)),
                              losses_counted=start.losses_counted + ran * world_size)
            saved = save_step(done, step + 1)
        if stop:
            barrier()  # rank 0 has written the checkpoint before any rank exits
            raise Preempted(stop, epoch, step + 1, steps, saved)
        if is_logging_step(step, steps, stepping):
            watch.raise_if_bad_on_any_rank(epoch, steps, schedule, scaler)
            progress.log(step, loss, grad_norm, optimizer, data_time)
    watch.raise_if_bad_on_any_rank(epoch, steps, schedule, scaler)
    counted = start.losses_counted + ran * world_size
    mean_loss = float(all_reduce_sum(loss_total)) / counted if counted else float("nan")
    return {"loss": mean_loss, "lr": max_lr(optimizer), **progress.metrics.averages()}
# ----------------------------------------------------------------------------- which steps do what


def is_logging_step(step: int, steps: int, stepping: Stepping) -> bool:
    """Whether micro-step ``step`` of an epoch of ``steps`` prints a progress line."""
    return step % stepping.print_freq == 0 or step == steps - 1


def norm_is_read(step: int, steps: int, stepping: Stepping) -> bool:
    """Whether a progress line shows the gradient norm of the update at micro-step ``step``
    before the next update replaces it; only those updates measure it (unless ``--clip_grad``
    needs it anyway), since the norm is a pass over every gradient (benchmarks/RESULTS.md)."""
    return any(is_logging_step(later, steps, stepping)
               for later in range(step, min(step + stepping.accum_iter, steps)))


def saves_a_step_checkpoint(step: int, steps: int, *, update: bool, stop: int, stepping: Stepping) -> bool:
    """Whether micro-step ``step`` ends with a step checkpoint: always when the ranks agreed to stop,
    else after an update ``--save_ckpt_steps`` asks for, unless the epoch's own checkpoint follows."""
    return bool(stop) or (update and step + 1 < steps and is_step_checkpoint(step, stepping))


def is_step_checkpoint(step: int, stepping: Stepping) -> bool:
    """Whether the optimizer update at micro-step ``step`` is one ``--save_ckpt_steps`` asks for."""
    every = stepping.save_ckpt_steps
    return bool(every) and ((step + 1) // stepping.accum_iter) % every == 0


# ----------------------------------------------------------------------------- the optimizer step


def grad_sync(model: torch.nn.Module, update: bool) -> ContextManager:
    """DDP's ``no_sync`` on micro-steps that do not update, so gradients are all-reduced once. A
    sharded model reduce-scatters every micro-step instead: its gradients then accumulate sharded,
    where skipping the sync would hold them whole between micro-steps (docs/memory.md)."""
    if update or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


def clip_or_measure_grad_norm(
    model: torch.nn.Module, clip_grad: Optional[float], measure: bool = True
) -> Optional[torch.Tensor]:
    """The total gradient norm, clipped to ``clip_grad`` when given. Without clipping it is only
    computed, and only when ``measure``: ``clip_grad_norm_(..., inf)`` would still multiply every
    gradient by 1, a second pass over them, and the norm itself is one more pass that only
    progress lines read (benchmarks/RESULTS.md). None when not measured. Over sharded gradients
    (``--fsdp``) the norm is the global one, over every rank's shards."""
    if clip_grad is None and not measure:
        return None
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if isinstance(norm, DTensor):  # sharded gradients: the norm over every rank's shards
        norm = norm.full_tensor()
    if clip_grad is not None:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), clip_grad, norm)
    return norm


def optimizer_step(
    state: TrainingState, clip_grad: Optional[float], measure_norm: bool = True
) -> Optional[torch.Tensor]:
    """Unscale, clip (or measure, if ``measure_norm``) the gradient norm, step, clear; returns the
    norm on the device, or None when it was neither needed nor asked for. A collective for a
    sharded model, whose norm sums every rank's shards."""
    state.scaler.unscale_(state.optimizer)
    grad_norm = clip_or_measure_grad_norm(unwrap_model(state.model), clip_grad, measure_norm)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    return grad_norm
