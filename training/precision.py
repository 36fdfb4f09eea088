"""The one precision vocabulary and switch of every script, benchmark and check: ``--amp
bf16|fp16|none`` (fp32 read as none), the default per device, autocast and the fp16 loss scaler."""
from contextlib import nullcontext
from typing import Any, ContextManager, Optional

import torch

AMP_CHOICES = ("bf16", "fp16", "none")  # the one precision vocabulary of every script, benchmark and check
AMP_SYNONYMS = {"fp32": "none"}  # full precision, as benchmarks and papers often say it


def amp_choice(value: str) -> str:
    """The ``type`` of every ``--amp`` flag: a synonym becomes its name, so ``choices`` stays the three."""
    return AMP_SYNONYMS.get(value.lower(), value.lower())


def add_amp_arg(parser: Any, *, default: Optional[str], help: str) -> None:
    """``--amp`` as every entry point takes it: bf16, fp16 or none (fp32 is read as none)."""
    parser.add_argument("--amp", default=default, type=amp_choice, choices=AMP_CHOICES,
                        help=f"{help}; fp32 is accepted for none")


def resolve_amp(amp: Optional[str], device: torch.device) -> str:
    """bf16 by default on GPUs that have it; full precision on CPU unless asked."""
    if amp is not None:
        return amp
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "none"


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> ContextManager:
    """The one precision switch: autocast to bf16/fp16, or nothing."""
    if amp == "none":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def make_grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """Loss scaling only for fp16; disabled it passes everything through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")
