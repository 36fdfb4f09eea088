"""The FLOPs the MFU curve divides by: ``training.flops`` counted from the layers against what
``torch.utils.flop_counter`` counts over a real training step (forward and backward)."""
import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import modeling_pretrain  # noqa: F401  (registers the pretrain_mae_* models)
from masking_generator import num_masked_patches, random_masks
from training.flops import mae_train_flops, vit_train_flops
from training.progress import mfu


def counted(step) -> int:
    """torch's own count of one step; attention as plain matmuls, which the counter knows."""
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def test_mae_flops_match_torchs_count_of_a_training_step():
    model = timm.create_model("pretrain_mae_tiny_patch16_224", img_size=64)
    imgs, batch = torch.randn(4, 3, 64, 64), 4
    num_masked = num_masked_patches(model.patch_embed.num_patches, 0.75)
    masks = random_masks(batch, model.patch_embed.num_patches, 0.75, torch.device("cpu"))

    def step():
        model.forward_loss(imgs, model(imgs, masks, num_masked), masks).backward()

    assert mae_train_flops(model, num_masked) * batch == pytest.approx(counted(step), rel=0.02)


def test_vit_flops_match_torchs_count_of_a_training_step():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10, global_pool="avg")
    imgs = torch.randn(4, 3, 64, 64)

    def step():
        model(imgs).sum().backward()

    assert vit_train_flops(model) * 4 == pytest.approx(counted(step), rel=0.02)


class Probe(torch.nn.Module):
    """The linear probe's shape: a frozen encoder run without gradients, a trained head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0).requires_grad_(False)
        self.head = torch.nn.Sequential(torch.nn.BatchNorm1d(192, affine=False), torch.nn.Linear(192, 10))

    def forward(self, imgs):
        with torch.no_grad():
            features = self.encoder(imgs)
        return self.head(features)


def test_probe_flops_count_the_frozen_encoder_forward_only():
    model, imgs = Probe(), torch.randn(4, 3, 64, 64)

    def step():
        model(imgs).sum().backward()

    assert vit_train_flops(model) * 4 == pytest.approx(counted(step), rel=0.02)


def test_mfu_is_the_share_of_the_peak_the_images_use():
    # 1e9 FLOPs an image at 400 images/s on a device of 1e12 FLOP/s: 40% of its peak
    assert mfu(1e9, 400.0, 1e12) == pytest.approx(0.4)


class Recorder:
    def __init__(self) -> None:
        self.logged = {}

    def add_scalars(self, values, step) -> None:
        self.logged.update(values)


def test_a_logging_step_gives_the_trackers_mfu_and_on_a_gpu_its_peak_memory(device):
    from training.performance import peak_flops
    from training.progress import Progress

    writer = Recorder()
    progress = Progress(epoch=0, steps=4, start_step=0, batch_size=8, log_writer=writer, flops_per_sample=1e9,
                        peak_flops=1e12)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, device=device))], lr=0.1)
    progress.log(0, torch.tensor(1.0, device=device), torch.tensor(0.5, device=device), optimizer, data_time=0.0)
    assert writer.logged["train/mfu"] == pytest.approx(1e9 * writer.logged["train/images_per_s"] / 1e12)
    assert ("train/peak_memory_gib" in writer.logged) == (device.type == "cuda")
    assert peak_flops(torch.device("cpu"), "bf16") is None and peak_flops(device, "none") is None
