"""Config files: ``--config FILE.yaml`` on every script, and the ``OUTPUT_DIR/config.yaml`` a run
writes of the settings it resolved, which ``--config`` takes back to repeat the run.

A file's keys are the flag names (``mask_ratio``, ``input_size``; ``--no-pin_mem`` is
``pin_mem: false``), its values what the flag takes. The command line overrides the file. Each
value goes through the flag's own type, choices and number of values, then through the numeric
checks every flag has (``training.settings``), so the file refuses what the flag would, in one
``error:`` line that names the key and the file, before anything is written.
"""
import argparse
import difflib
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from training.settings import validate_numbers
from utils import USAGE_EXIT_CODE, RunFailure, UsageError, atomic_write, is_main_process, raise_on_all_ranks

CONFIG_NAME = "config.yaml"
NOT_IN_FILE = ("config", "help", "local_rank")  # the file itself, and what the launcher sets
BOOLEAN_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


class ConfigArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with ``--config FILE.yaml``: the file's values fill the
    namespace first, then the command line is parsed over them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--config", default=None, metavar="FILE.yaml",
                          help="take flags from this YAML file (keys are the flag names); the command line wins")

    def parse_known_args(self, args: Optional[Sequence[str]] = None,
                         namespace: Optional[argparse.Namespace] = None) -> Tuple[argparse.Namespace, List[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        path = config_path(argv)
        if path is None or namespace is not None:
            return super().parse_known_args(argv, namespace)
        try:
            values = read_config(self, path)
        except UsageError as error:
            self.exit(USAGE_EXIT_CODE, f"error: {error}\n")
        required = [action for action in self._actions if action.required and action.dest in values]
        for action in required:  # a required flag the file gives is no longer missing
            action.required = False
        try:
            return super().parse_known_args(argv, argparse.Namespace(**values))
        finally:
            for action in required:
                action.required = True


def config_path(argv: Sequence[str]) -> Optional[str]:
    """The ``--config`` of a command line, or None."""
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config", default=None)
    return finder.parse_known_args(argv)[0].config


def flag_actions(parser: argparse.ArgumentParser) -> Dict[str, Tuple[argparse.Action, bool]]:
    """Each optional flag by its names without dashes (``local_rank`` and ``local-rank``) and by its
    dest, with whether a ``true`` there means the dest's False (``cls_token: true`` is
    ``global_pool: false``); a ``--no-X`` switch only as ``X: false``."""
    actions: Dict[str, Tuple[argparse.Action, bool]] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in NOT_IN_FILE:
            continue
        negates = isinstance(action, argparse._StoreFalseAction)
        for option in action.option_strings:
            if not option.startswith("--no-"):
                actions[option.lstrip("-")] = (action, negates)
        actions.setdefault(action.dest, (action, False))  # the dest itself: its value as written
    return actions


def read_config(parser: argparse.ArgumentParser, path: str) -> Dict[str, Any]:
    """The file's values by flag dest, each as the flag would have parsed and checked it."""
    source = Path(path)
    if not source.is_file():
        raise UsageError(f"--config {path} does not exist")
    try:
        loaded = yaml.safe_load(source.read_text())
    except yaml.YAMLError as error:
        raise UsageError(f"--config {path} is not valid YAML: {str(error).splitlines()[0]}") from error
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"--config {path} must map flag names to values, not hold a {type(loaded).__name__}")
    actions = flag_actions(parser)
    values = {}
    for key, value in loaded.items():
        if key not in actions:
            close = difflib.get_close_matches(str(key), list(actions), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UsageError(f"--config {path}: unknown key {key!r}{hint}")
        action, negates = actions[key]
        try:
            parsed = flag_value(action, value)
            values[action.dest] = not parsed if negates and isinstance(parsed, bool) else parsed
        except ValueError as error:
            raise UsageError(f"--config {path}: {key}: {error}") from error
    try:
        validate_numbers(argparse.Namespace(**values))
    except UsageError as error:
        raise UsageError(f"--config {path}: {error}") from error
    return values


def flag_value(action: argparse.Action, value: Any) -> Any:
    """``value`` as ``action``'s flag would give it; ValueError saying why not."""
    if isinstance(action, BOOLEAN_ACTIONS):
        if not isinstance(value, bool):
            raise ValueError(f"takes true or false, got {value!r}")
        return value
    if value is None:
        if action.default is None:
            return None
        raise ValueError(f"takes a value (default {action.default!r}), got null")
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise ValueError(f"takes {action.nargs} values, got {len(items)}")
        if action.nargs == "+" and not items:
            raise ValueError("takes at least one value, got none")
        return [one_value(action, item) for item in items]
    return one_value(action, value)


def one_value(action: argparse.Action, value: Any) -> Any:
    """One item through the flag's type and choices."""
    if isinstance(value, (list, dict, bool)):
        raise ValueError(f"takes {'one value' if action.nargs is None else 'values'} of its type, got {value!r}")
    text = value if isinstance(value, str) else str(value)
    try:
        converted = action.type(text) if action.type is not None else text
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ValueError(f"{value!r} is not a valid {getattr(action.type, '__name__', 'value')}") from error
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"must be one of {', '.join(map(str, action.choices))}; got {value!r}")
    return converted


# ----------------------------------------------------------------------------- the run's own config.yaml


def resolved_config(parser: argparse.ArgumentParser, record: Mapping[str, Any],
                    derived: Mapping[str, str]) -> str:
    """The YAML of a run's resolved flags (``record``: ``training.config.plain_record``), in the
    parser's order. A value in ``derived`` (flag -> how it was derived) is written as a comment,
    so the file repeats the run and still lets ``--blr`` or ``--output_dir`` change what follows."""
    keys = [action.dest for action in parser._actions
            if action.option_strings and action.dest not in NOT_IN_FILE and action.dest in record]
    lines = ["# the settings this run resolved; repeat it with: --config config.yaml",
             "# (command-line flags override the file)"]
    for key in dict.fromkeys(keys):
        text = yaml.safe_dump({key: record[key]}, default_flow_style=True, width=1 << 16).strip()
        text = text[1:-1] if text.startswith("{") else text  # {key: value} -> key: value
        lines.append(f"# {text}  ({derived[key]})" if key in derived else text)
    return "\n".join(lines) + "\n"


def write_config(output_dir: Optional[str], text: str) -> None:
    """``OUTPUT_DIR/config.yaml``, atomically, written by rank 0; its failure (a full disk) stops
    every rank with the cause (a collective: call it on every rank)."""
    error = None
    if output_dir and text and is_main_process():
        try:
            with atomic_write(Path(output_dir) / CONFIG_NAME) as tmp:
                tmp.write_text(text)
        except OSError as failure:
            error = RunFailure(f"could not write {Path(output_dir) / CONFIG_NAME}: {failure}")
    raise_on_all_ranks(error)
