"""What every settings object is, and the one home of the numeric checks: the range of each numeric
flag (``NUMBER_RANGES``) and the values the method refuses (``METHOD_CHECKS``).

``training.config`` turns the parsed flags once into small frozen settings, one per component (the
schedule, the steps, checkpointing, resuming, stopping, the loaders, the optimizer, the wrapping,
the encoder and its data), each declared beside the code that reads it, so a signature says what a
function depends on. Their fields carry the flags' names, and each checks itself on creation with
the same ranges the command line is checked with: the same words, whichever meets a bad value first.
"""
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Type, TypeVar

from masking_generator import check_mask_ratio
from utils import UsageError


@dataclass(frozen=True)
class Range:
    """The values a numeric flag may take: finite, from ``low`` to ``high``; ``said`` replaces the
    generated words, ``hint`` is added after the value."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True
    said: str = ""
    hint: str = ""

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below

    def words(self) -> str:
        if self.said:
            return self.said
        if self.high < math.inf:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low == -math.inf:
            return "a finite number"
        if self.low == 0 and self.low_open:
            return "positive"
        return f"above {self.low:g}" if self.low_open else f"at least {self.low:g}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)  # [0, 1)
PROBABILITY = Range(0, 1, high_open=False)  # [0, 1]
NUMBER_RANGES = {  # every numeric flag of the scripts that has it; None (unset) always passes
    "lr": POSITIVE, "blr": POSITIVE, "min_lr": NON_NEGATIVE, "warmup_epochs": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE, "opt_eps": POSITIVE, "opt_betas": FRACTION, "momentum": FRACTION,
    "layer_decay": Range(0, 1, low_open=True, high_open=False), "drop_path": FRACTION, "num_images": Range(1),
    "smoothing": FRACTION, "reprob": PROBABILITY, "mixup": NON_NEGATIVE, "cutmix": NON_NEGATIVE,
    "cutmix_minmax": PROBABILITY, "mixup_prob": PROBABILITY, "mixup_switch_prob": PROBABILITY,
    "color_jitter": NON_NEGATIVE, "temperature": POSITIVE, "mean": Range(-math.inf), "std": POSITIVE,
    "batch_size": Range(1), "accum_iter": Range(1), "epochs": Range(1), "save_ckpt_freq": Range(1),
    "print_freq": Range(1), "num_samples": Range(1), "num_workers": Range(0), "max_image_pixels": Range(1),
    "input_size": Range(1), "in_chans": Range(1), "patch_size": Range(1), "start_epoch": Range(0),
    "crop_scale": Range(0, 1, low_open=True, high_open=False), "hflip": PROBABILITY, "recount": Range(1),
    "nb_classes": Range(1), "nb_knn": Range(1), "dist_timeout": POSITIVE, "shuffle_window": Range(1),
    "clip_grad": Range(0, low_open=True, said="a positive norm", hint="leave it out for no clipping"),
    "save_ckpt_steps": Range(0, said="0 (off) or positive"), "eval_freq": Range(1), "eval_num_samples": Range(1),
    "shard_cache_gb": POSITIVE, "shard_retries": Range(0),
}


METHOD_CHECKS = {"mask_ratio": check_mask_ratio}  # flags whose values the method's own code states


def validate_numbers(values: Any) -> None:
    """Refuse a negative, zero, infinite or NaN value where the flag's ``NUMBER_RANGES`` forbid it,
    and a value the method refuses (``METHOD_CHECKS``), each in the words of the flag. ``values``:
    any object whose attributes carry flag names, the parsed command line or a settings object."""
    for flag, allowed in NUMBER_RANGES.items():
        value = getattr(values, flag, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and not allowed.holds(item):
                hint = f"; {allowed.hint}" if allowed.hint else ""
                raise UsageError(f"--{flag} must be {allowed.words()}, got {item}{hint}")
    for flag, check in METHOD_CHECKS.items():
        if getattr(values, flag, None) is not None:
            try:
                check(getattr(values, flag))
            except ValueError as error:
                raise UsageError(f"--{error}") from error


@dataclass(frozen=True)
class Settings:
    """A component's settings: frozen, their fields named as the flags they come from, checked on
    creation (``validate_numbers``); a subclass adds the checks that span its fields."""

    def __post_init__(self) -> None:
        validate_numbers(self)


S = TypeVar("S", bound=Settings)


def pick(kind: Type[S], values: Mapping[str, Any], **derived: Any) -> S:
    """``kind`` from the entries of ``values`` named as its fields (``derived`` first): what
    ``training.config`` hands each component. A field ``values`` lacks keeps its default."""
    taken = {field.name: values[field.name] for field in fields(kind) if field.name in values}
    return kind(**{**taken, **derived})
