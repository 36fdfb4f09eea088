"""What the preemption check costs a training step: the ranks' agreement after every optimizer step
(``training.preemption.PreemptionWatch.agreed``, one all-reduce of one integer on the host).

Under a launcher, each process trains MAE with DDP on one fixed random batch; steps with and
without the agreement take turns, and the agreement alone is timed over many calls. The last line
printed (rank 0) is one JSON object.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/bench_signal_check.py \\
        --model pretrain_mae_base_patch16_224 --batch_size 2 --steps 5
"""
import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_train.py, for a shared CPU
import timm  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import modeling_pretrain  # noqa: E402,F401  registers the pretrain_mae_* models
import utils  # noqa: E402
from bench_train import pretrain_loss, train_step  # noqa: E402
from training import precision  # noqa: E402
from training.checkpoint import TrainingState  # noqa: E402
from masking_generator import random_masks  # noqa: E402
from optim_factory import add_optimizer_args, create_optimizer  # noqa: E402
from training.config import optimizer_of  # noqa: E402
from training.preemption import PreemptionWatch  # noqa: E402
from training.wrapping import Wrapping, wrap_model  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pretrain_mae_base_patch16_224")
    parser.add_argument("--batch_size", default=2, type=int, help="images per process per step")
    parser.add_argument("--input_size", default=224, type=int)
    parser.add_argument("--steps", default=5, type=int, help="timed steps of each kind, taking turns")
    parser.add_argument("--calls", default=1000, type=int, help="agreements timed on their own")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lr", default=1.0e-4, type=float)
    add_optimizer_args(parser, weight_decay=0.05, betas=(0.9, 0.95))
    return parser.parse_args(argv)


def seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> dict:
    device = utils.init_distributed(args.device)
    utils.seed_everything(0)
    model = timm.create_model(args.model, img_size=args.input_size).to(device)
    imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)  # (B, 3, H, W)
    masks = random_masks(args.batch_size, model.patch_embed.num_patches, 0.75, device=device)  # (B, N)
    wrapping = Wrapping(distributed=utils.get_world_size() > 1)
    state = TrainingState(wrap_model(model, device, wrapping), create_optimizer(optimizer_of(args), model, device),
                          precision.make_grad_scaler(device, "none"))
    step = train_step(state, pretrain_loss(imgs, masks), device, "none")
    watch = PreemptionWatch([signal.SIGTERM])
    step()  # warm-up
    plain, checked = [], []
    for _ in range(args.steps):
        plain.append(seconds(step))
        checked.append(seconds(lambda: (step(), watch.agreed())))
    agreement = [seconds(watch.agreed) for _ in range(args.calls)]
    report = {
        "model": args.model, "batch_size": args.batch_size, "world_size": utils.get_world_size(),
        "threads": torch.get_num_threads(), "step_s": statistics.median(plain),
        "step_with_check_s": statistics.median(checked), "agreement_us": statistics.median(agreement) * 1e6,
        "agreement_share_of_step": statistics.median(agreement) / statistics.median(plain),
    }
    if utils.is_main_process():
        print(json.dumps(report), flush=True)
    utils.cleanup_distributed()
    return report


if __name__ == "__main__":
    main(parse_args())
