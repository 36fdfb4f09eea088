"""The scripts, the benchmarks and ``benchmarks/gpu_checks.sh`` speak one language, and the checks
cannot rot between the rare GPUs: every command a check would start, with a GPU's settings and
with the CPU dry run's, is accepted by its own script's parser (and, where it runs on this CPU, by
the settings it resolves to) on every CI run, in this process; the parts fit their device calls."""
import contextlib
import importlib
import io
import os
import re
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest

import run_class_finetuning
import run_knn_eval
import run_linear_probe
import run_mae_pretraining
from training.config import resolve_pretraining

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_checks.sh"
TINY = "pretrain_mae_tiny_patch16_224"
PARTS = {1: ["env", "tests", "fsdp_bf16", "sigterm", "max_batch_large", "max_batch_huge"],
         2: ["max_batch_giant", "max_batch_2b", "compiled_plain", "compiled_fsdp"],
         3: ["data", "epochs_pil", "epochs_device", "train_eager", "train_compiled", "data_finetune"]}
START_UP_S = 10  # what one check costs beyond its command: python and torch starting, files written
DRY_RUN = dict(DEVICE="cpu", BATCH="2", IMAGES="8", WORKERS="1", INPUT_SIZE="32", WARMUP="1", STEPS="2", MODEL=TINY,
               BIG_MODELS=TINY, MAX_BATCH="4")  # the script's header gives the same settings
FULL_PRECISION = {"none", "fp32"}  # the two words for no autocast; every --amp takes both


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


def planned_commands(out: Path, settings: Dict[str, str]) -> List[Tuple[str, List[str]]]:
    """(check, python3's arguments) of every command the three parts would start (``PLAN=1``)."""
    env = {**os.environ, **settings, "OUT": str(out), "PLAN": "1"}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.findall(r"^== (\S+) ", result.stdout, re.MULTILINE) == [name for names in PARTS.values()
                                                                      for name in names]
    records = (out / "plan.txt").read_text().split("\x1e")[:-1]
    return [(fields[0], fields[1:]) for fields in (record.split("\x1f")[:-1] for record in records)]


def script_parser(path: str) -> Callable[[List[str]], object]:
    """The parse function of the script at ``path`` (relative to the repository)."""
    module = importlib.import_module(Path(path).stem)  # the root and benchmarks/ are both on sys.path
    return module.get_args_parser().parse_args if hasattr(module, "get_args_parser") else module.parse_args


def accept(check: str, argv: List[str], on_this_cpu: bool) -> None:
    """Fail with the script's own message unless the command would start as planned."""
    if argv[0] == "-c":
        compile(argv[1], f"<{check}>", "exec")
        return
    if argv[:2] == ["-m", "pytest"]:
        assert argv[2:] == ["-q", "tests", "-k", "cuda"], argv
        return
    if argv[:2] == ["-m", "torch.distributed.run"]:  # the launcher's own options, then the script's
        argv = argv[next(index for index, word in enumerate(argv) if word.endswith(".py")):]
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            args = script_parser(argv[0])(argv[1:])
        except SystemExit:
            pytest.fail(f"check {check}: {argv[0]} refuses {' '.join(argv[1:])}:\n{errors.getvalue()}")
    if on_this_cpu and argv[0] == "run_mae_pretraining.py":
        if args.data_path:  # the images the check writes before it trains
            Path(args.data_path).mkdir(parents=True, exist_ok=True)
        resolve_pretraining(args)


@pytest.mark.parametrize("settings", [{}, {**DRY_RUN, "AMP": "none"}, {**DRY_RUN, "AMP": "fp32"},
                                      {**DRY_RUN, "AMP": "bf16"}], ids=["gpu", "dry-none", "dry-fp32", "dry-bf16"])
def test_every_command_a_check_starts_is_accepted_by_its_scripts_parser(settings, tmp_path, monkeypatch):
    """The GPU's commands as a lent H100/H200 runs them, and the dry run's with each precision
    (without bf16 units a host's dry run uses none, or its synonym fp32), whatever this host has."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    commands = planned_commands(tmp_path / "plan", settings)
    assert {check for check, _ in commands} == {name for names in PARTS.values() for name in names}
    for check, argv in commands:
        accept(check, argv, on_this_cpu=settings.get("DEVICE") == "cpu")


ENTRY_POINTS = {"run_mae_pretraining.py": run_mae_pretraining.get_args_parser,
                "run_class_finetuning.py": run_class_finetuning.get_args_parser,
                "run_linear_probe.py": run_linear_probe.get_args_parser,
                "run_knn_eval.py": run_knn_eval.get_args_parser}
BENCHMARKS = ("bench_train", "bench_max_batch")


def precisions_named_anywhere() -> set:
    """Every ``--amp`` value and ``AMP=`` the README, the docs pages, the recipes, the results page and
    the scripts use."""
    texts = [(REPO / name).read_text() for name in ("README.md", "benchmarks/RESULTS.md", "benchmarks/gpu_checks.sh")]
    texts += [path.read_text() for path in (*(REPO / "docs").glob("*.md"), *(REPO / "recipes").glob("*.yaml"))]
    texts += [path.read_text() for path in REPO.glob("*.py")] + [path.read_text() for path in
                                                                   (REPO / "benchmarks").glob("*.py")]
    return {value for text in texts for value in re.findall(r"(?:--amp |AMP=|AMP:-|(?m:^)amp: )(\w+)", text)}


def test_every_entry_point_takes_every_precision_any_other_one_names(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    parsers = {name: parser().parse_args for name, parser in ENTRY_POINTS.items()}
    parsers.update({name: importlib.import_module(name).parse_args for name in BENCHMARKS})
    named = precisions_named_anywhere()
    assert {"bf16", "none", "fp32"} <= named, named  # the search finds what it looks for
    named |= {value for parser in ENTRY_POINTS.values() for action in parser()._actions
              if "--amp" in action.option_strings for value in action.choices}
    for name, parse in parsers.items():
        for value in named:
            assert parse(["--amp", value]).amp == ("none" if value in FULL_PRECISION else value), (name, value)
