"""Run a training script under any launcher with one fault in one rank's process, as a cluster
produces it, and record how each process ended. The product has no fault hooks: this wrapper
patches the process of rank $FAULT_RANK before the script starts.

$FAULT_SCRIPT: the script's module (run_mae_pretraining by default); $FAULT, one of:
  nan_loss      the loss of this process's micro-step $FAULT_STEP (counted from 0) is NaN;
  corrupt_read  reading checkpoint-last.pth fails as a truncated file does;
  memory_error  reading any checkpoint file raises MemoryError;
  bad_shard     this rank finds a tar shard truncated (a node whose copy stopped short);
  sigterm       this process gets SIGTERM during its micro-step $FAULT_STEP: a preemption at a known step;
  kill_server   this process kills the process $SERVER_PID (an object store) during its micro-step $FAULT_STEP;
  eval_error    the k-NN of the evaluation during pretraining fails on this rank;
  probe_error   the sweep probe's heads of that evaluation fail on this rank (the others train theirs).
Every rank writes its exit code to $RECORD_DIR/exit_rank{RANK}.
"""
import importlib
import os
import signal
from pathlib import Path

import torch

import datasets
import engine_for_pretraining
import evaluation.linear_sweep
import evaluation.online
import utils
from helpers import exit_code_recorded

FAULT, RANK = os.environ.get("FAULT", ""), int(os.environ.get("RANK", "0"))
FAULTED = RANK == int(os.environ.get("FAULT_RANK", "1"))


def nan_at_step(step: int) -> None:
    original = engine_for_pretraining.reconstruction_loss

    def poisoned(*args, **kwargs):
        loss_fn, calls = original(*args, **kwargs), []

        def loss(batch):
            calls.append(None)
            value = loss_fn(batch)
            return value * float("nan") if len(calls) - 1 == step else value

        return loss

    engine_for_pretraining.reconstruction_loss = poisoned


def kill_at_step(step: int, pid: int, signum: int) -> None:
    original = engine_for_pretraining.reconstruction_loss

    def killing(*args, **kwargs):
        loss_fn, calls = original(*args, **kwargs), []

        def loss(batch):
            calls.append(None)
            if len(calls) - 1 == step:
                os.kill(pid, signum)
            return loss_fn(batch)

        return loss

    engine_for_pretraining.reconstruction_loss = killing


def failing_reads(should_fail, error) -> None:
    original = torch.load

    def load(path, *args, **kwargs):
        if isinstance(path, (str, Path)) and should_fail(Path(path)):
            raise error
        return original(path, *args, **kwargs)

    torch.load = load


if FAULTED and FAULT == "nan_loss":
    nan_at_step(int(os.environ.get("FAULT_STEP", "0")))
elif FAULTED and FAULT == "sigterm":
    kill_at_step(int(os.environ.get("FAULT_STEP", "0")), os.getpid(), signal.SIGTERM)
elif FAULTED and FAULT == "kill_server":
    kill_at_step(int(os.environ.get("FAULT_STEP", "0")), int(os.environ["SERVER_PID"]), signal.SIGKILL)
elif FAULTED and FAULT == "corrupt_read":
    failing_reads(lambda path: path.name == "checkpoint-last.pth",
                  RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory"))
elif FAULTED and FAULT == "memory_error":
    failing_reads(lambda path: path.suffix == ".pth", MemoryError("cannot allocate 9.6 GB"))
elif FAULTED and FAULT == "bad_shard":
    def truncated(spec, index_dir, cache=None):
        raise utils.UsageError(f"shard {spec} is truncated: it ends inside a member")

    datasets.catalog_shards = truncated
elif FAULTED and FAULT == "eval_error":
    def failing_knn(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    evaluation.online.knn_accuracy = failing_knn
elif FAULTED and FAULT == "probe_error":
    def failing_heads(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    evaluation.linear_sweep.train_heads = failing_heads


if __name__ == "__main__":
    script = importlib.import_module(os.environ.get("FAULT_SCRIPT", "run_mae_pretraining"))
    with exit_code_recorded():
        utils.exit_on_usage_error(script.main, script.get_args_parser().parse_args())
