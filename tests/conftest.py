"""Make the repository's modules importable from the tests and keep torch to the CI's cores."""
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def device(request) -> torch.device:
    """For code that runs on the training device: tested on the CPU everywhere and on CUDA too
    where there is a GPU (CI has none)."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> Path:
    """The 2-process (DDP) pretraining run that interrupted and sharded 2-process runs are
    compared with, its recorded steps (``helpers.records``) and each rank's final weights; its
    ranks started one by one (the runs under torchrun must end where it ends)."""
    from helpers import PRETRAIN, RECORDER, run_ranks

    out = tmp_path_factory.mktemp("straight")
    outputs = run_ranks([*PRETRAIN, "--output_dir", str(out / "out")], out / "records", script=RECORDER)
    assert [code for code, _ in outputs] == [0, 0], outputs
    return out


@pytest.fixture(scope="session")
def pretrained_mae(tmp_path_factory) -> Path:
    """The one tiny MAE checkpoint the tests finetune, probe, picture and convert: four short
    epochs of norm-pixel pretraining on 256 synthetic images at 32 px, as a user's run leaves it."""
    import run_mae_pretraining
    from helpers import TINY_MAE

    out = tmp_path_factory.mktemp("pretrained_mae")
    run_mae_pretraining.main(run_mae_pretraining.get_args_parser().parse_args(
        [*TINY_MAE, "--num_samples", "256", "--batch_size", "64", "--epochs", "4", "--warmup_epochs", "1",
         "--blr", "1.5e-3", "--norm_pix_loss", "--print_freq", "1000", "--output_dir", str(out)]))
    return out / "checkpoint-last.pth"


SERVERS = {}  # started once the session's tests are collected


def pytest_collection_finish(session) -> None:
    """Start the MLflow server the tracker tests need as soon as they are selected: it boots on the
    second core while the tests before them run."""
    if any(item.nodeid.startswith("tests/test_trackers.py") for item in session.items):
        import tempfile

        from helpers import MlflowServer

        SERVERS["mlflow"] = MlflowServer(Path(tempfile.mkdtemp(prefix="mlflow-server-")))


@pytest.fixture(scope="session")
def mlflow_server():
    server = SERVERS["mlflow"]
    server.wait_ready()
    yield server
    server.stop()


def pytest_sessionfinish(session, exitstatus) -> None:
    import shutil

    for server in SERVERS.values():
        server.stop()
        shutil.rmtree(server.log_path.parent, ignore_errors=True)
