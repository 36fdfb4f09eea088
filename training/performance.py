"""Switches that make a step faster without changing the model: glibc's malloc on CPU, the attention
path for each device and precision (``torch.compile`` is ``training.wrapping``'s). What each buys is measured in
``benchmarks/RESULTS.md``; this module imports nothing of the repository.
"""
import ctypes
from typing import Optional

import timm
import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's <malloc.h>
MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest mmap threshold glibc accepts on 64-bit machines
TRIM_THRESHOLD = 2**31 - 1  # the largest a C int holds: freed memory stays with the process


def reuse_freed_memory() -> bool:
    """Have glibc's malloc serve blocks up to 32 MiB from its heap and keep what is freed there.

    A CPU training step frees and allocates the same large tensors every step (autocast's bf16
    copies of the weights, their gradients, activations); by default glibc maps the large ones
    with fresh pages, which fault in on first touch, and hands them back when freed. The process
    keeps its peak memory in exchange, which a training run reaches every step anyway. Returns
    False, changing nothing, where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def fused_attention_is_faster(device: torch.device, amp: str) -> bool:
    """Everywhere but bf16 on CPU, where the backward of torch's CPU flash attention is slower
    than timm's own matmul-softmax path; in fp32 and on GPUs the fused kernel is the faster one."""
    return not (device.type == "cpu" and amp == "bf16")


def use_fastest_attention(model: torch.nn.Module, device: torch.device, amp: str) -> None:
    """Switch every timm ``Attention`` between ``F.scaled_dot_product_attention`` and timm's
    matmul-softmax path, whichever ``fused_attention_is_faster`` says trains faster here."""
    fused = fused_attention_is_faster(device, amp)
    for module in model.modules():
        if isinstance(module, timm.layers.Attention):
            module.fused_attn = fused


# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets, TFLOP/s, first match of the name wins
PEAK_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4), ("A100", 312.0),
               ("L40S", 362.1), ("L4", 121.0), ("A10", 125.0))


def peak_flops(device: torch.device, amp: str) -> Optional[float]:
    """The device's peak FLOP/s in the run's precision where its datasheet is known here (a GPU of
    ``PEAK_TFLOPS`` under bf16 or fp16), else None: the MFU curve needs it."""
    if device.type != "cuda" or amp not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in name), None)
