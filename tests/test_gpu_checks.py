"""``benchmarks/gpu_checks.sh`` cannot rot between the rare GPUs: its CPU dry run passes every check
on every CI run, and its parts fit the device calls they are meant for."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_checks.sh"
TINY = "pretrain_mae_tiny_patch16_224"
PARTS = {1: ["env", "tests", "fsdp_bf16", "sigterm", "max_batch_large", "max_batch_huge"],
         2: ["max_batch_giant", "max_batch_2b", "compiled_plain", "compiled_fsdp"],
         3: ["data", "epochs_pil", "epochs_device", "train_eager", "train_compiled", "data_finetune"]}
START_UP_S = 10  # what one check costs beyond its command: python and torch starting, files written


def has_bf16_units() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def limits() -> Dict[int, List[int]]:
    """Each part's checks' time limits, as the script states them."""
    text = SCRIPT.read_text()
    found = {}
    for part in PARTS:
        body = text.split(f"part_{part}() {{", 1)[1].split("\n}", 1)[0]
        found[part] = [int(seconds) for seconds in re.findall(r"check \S+ (\d+) ", body)]
    return found


def test_the_parts_fit_their_device_calls():
    """Parts 1 and 2 at most 12 minutes together, each call (part) at most 10."""
    seconds = {part: sum(values) + START_UP_S * len(values) for part, values in limits().items()}
    assert [len(values) for values in limits().values()] == [len(names) for names in PARTS.values()]
    assert seconds[1] + seconds[2] <= 12 * 60 and max(seconds.values()) <= 10 * 60, seconds


def dry_run_env(out: Path) -> Dict[str, str]:
    """The script's CPU dry run: tiny models, a few images of 32 pixels, two timed steps."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # our python3
                OUT=str(out), DEVICE="cpu", AMP="bf16" if has_bf16_units() else "fp32", BATCH="2", IMAGES="8",
                WORKERS="1", INPUT_SIZE="32", WARMUP="1", STEPS="2", MODEL=TINY, BIG_MODELS=TINY, MAX_BATCH="4",
                OMP_NUM_THREADS="1")


def test_the_cpu_dry_run_passes_every_check(tmp_path):
    """The three parts side by side (each of the 16 checks starts a Python with torch, which alone
    takes seconds here), every check exiting 0."""
    began = time.monotonic()
    parts = {part: subprocess.Popen(["bash", str(SCRIPT)], env={**dry_run_env(tmp_path / "gc"), "PART": str(part)},
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for part in PARTS}
    outputs = {part: process.communicate(timeout=600)[0] for part, process in parts.items()}
    elapsed = time.monotonic() - began
    for part, output in outputs.items():
        names = re.findall(r"^== (\S+) ", output, re.MULTILINE)
        codes = re.findall(r"^   exit (\d+);", output, re.MULTILINE)
        assert names == PARTS[part] and len(codes) == len(names), output
        failed = [name for name, code in zip(names, codes) if code != "0"]
        assert not failed, "\n".join(f"{name}:\n{(tmp_path / 'gc' / f'{name}.log').read_text()[-2000:]}"
                                     for name in failed)
    print(f"dry run: {elapsed:.0f} s")
