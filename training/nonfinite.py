"""The watch for a non-finite loss: kept on the device every step, read at logging steps, step
checkpoints and the epoch's end, and every rank's decision, so all ranks stop together."""
import torch

from training.lr_schedule import Schedule, lr_at
from utils import NonFiniteLossError, all_reduce_min, get_rank, get_world_size

FP16_NONFINITE_PATIENCE = 10  # consecutive skipped fp16 steps before the run is called lost
NO_BAD_STEP = 2**62  # what a rank whose losses are all finite contributes to the agreement


class NonFiniteWatch:
    """Tracks, on the device, the first step that ends a run of ``patience`` non-finite losses.

    Without a grad scaler one bad loss already poisons the weights, so patience is 1. With fp16
    the scaler skips such steps and lowers the scale; only a run of them means the run is lost.
    Reading a loss back every step would stall the host while the GPU drains, so the check stays
    on the device and is read only at logging steps, before step checkpoints and at epoch end.
    """

    def __init__(self, device: torch.device, patience: int = 1) -> None:
        self.patience = patience
        self.streak = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        finite = torch.isfinite(loss.detach())
        self.streak = torch.where(finite, torch.zeros_like(self.streak), self.streak + 1)
        bad_now = (self.streak >= self.patience) & (self.first_bad < 0)
        self.first_bad = torch.where(bad_now, torch.full_like(self.first_bad, step), self.first_bad)

    def raise_if_bad_on_any_rank(self, epoch: int, steps_per_epoch: int, schedule: Schedule,
                                 scaler: torch.amp.GradScaler) -> None:
        """A collective: when any rank's loss went bad, every rank raises the same error, naming the
        first bad step and its rank, so no rank goes on alone into the next collective (under NCCL
        it would wait there for the watchdog) and no checkpoint is written from that step on."""
        world_size = get_world_size()
        first = int(self.first_bad)
        code = first * world_size + get_rank() if first >= 0 else NO_BAD_STEP
        code = all_reduce_min(code, self.first_bad.device)
        if code == NO_BAD_STEP:
            return
        step, rank = divmod(code, world_size)
        lr = lr_at(epoch + step / steps_per_epoch, schedule)
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        where = f" on rank {rank}" if world_size > 1 else ""
        raise NonFiniteLossError(
            f"loss is not finite{where} at epoch {epoch} step {step} (lr {lr:.3g}, loss scale {scale:g}); "
            "stopping without saving, the last good checkpoint is untouched. Lower --blr, "
            "raise --warmup_epochs or use --amp bf16"
        )


