"""Where an epoch begins after a resume, on any number of processes: the position a step checkpoint
records, and the reader for step checkpoints written before positions were counted."""
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple


@dataclass(frozen=True)
class EpochStart:
    """Where an epoch begins: at its start, or part-way after a step checkpoint, possibly written
    by a run on another number of processes.

    Positions count samples of the epoch's global order (``image_data.epoch_order.EpochSampler``), which does
    not depend on the number of processes; the loss sums let the epoch's mean loss come out as an
    uninterrupted run's.
    """

    samples_done: int = 0  # positions of the epoch's global order trained on, over all ranks
    samples_per_epoch: Optional[int] = None  # of the run that wrote it; None: this run's
    loss_sums: Tuple[float, ...] = ()  # each rank's sum of its micro-batch losses so far
    losses_counted: int = 0  # micro-batch losses in those sums, over all ranks

    def loss_sum_of(self, rank: int, world_size: int) -> float:
        """This rank's starting sum: its own at the same world size (so the sums add up in the same
        order as an uninterrupted run's), else all of them on rank 0."""
        if len(self.loss_sums) == world_size:
            return self.loss_sums[rank]
        return sum(self.loss_sums) if rank == 0 else 0.0

    def to_checkpoint(self, step: int) -> Dict[str, Any]:
        """The keys a step checkpoint stores; ``step`` is the micro-steps done, for messages."""
        return {"step": step, "samples_done": self.samples_done, "samples_per_epoch": self.samples_per_epoch,
                "loss_sums": list(self.loss_sums), "losses_counted": self.losses_counted}


def epoch_start(checkpoint: Mapping[str, Any], epoch: int) -> EpochStart:
    """Where ``epoch`` begins: part-way through when ``checkpoint`` was written mid-way through it."""
    if "step" not in checkpoint or checkpoint["epoch"] != epoch:
        return EpochStart()
    if "samples_done" in checkpoint:
        return EpochStart(samples_done=checkpoint["samples_done"], samples_per_epoch=checkpoint["samples_per_epoch"],
                          loss_sums=tuple(checkpoint["loss_sums"]), losses_counted=checkpoint["losses_counted"])
    # written before positions were counted: ``step`` batches on each rank, and rank 0's loss sum,
    # which every rank then resumed from
    written_by = checkpoint["args"]
    world_size, step = written_by.get("world_size", 1), checkpoint["step"]
    return EpochStart(samples_done=step * written_by["batch_size"] * world_size,
                      loss_sums=(checkpoint["loss_sum"],) * world_size, losses_counted=step * world_size)
