"""The README's "Where things are" table is the layout: every module is in it, imports only what
its row allows, and only modules above it; no library module imports a ``run_*`` script."""
import ast
import re
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = "library modules"


def table_rows() -> List[List[str]]:
    """The cells of the README's "Where things are" table, one list per row, in order."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def ours() -> Set[str]:
    return {path.stem for path in REPO.glob("*.py")}


def is_script(name: str) -> bool:
    return name.startswith("run_")


def imports_of(path: Path) -> Set[str]:
    """The repository modules ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & ours()


def allowed_imports() -> Dict[str, Set[str]]:
    """Row file -> the modules its last cell allows: named ones, "nothing", or "library modules"
    (every module that is not a script), with "the `run_*` scripts" adding the scripts."""
    allowed = {}
    for cells in table_rows():
        name = cells[0].strip("`").removesuffix(".py")
        rule = cells[-1]
        names = set(re.findall(r"`([a-z_]+)`", rule))
        if LIBRARY in rule:
            names |= {module for module in ours() if not is_script(module)}
        if "`run_*`" in rule:
            names |= {module for module in ours() if is_script(module)}
        allowed[name] = names - {name}
    return allowed


def test_every_module_has_a_row():
    rows = allowed_imports()
    assert ours() <= set(rows), f"modules missing from the README table: {sorted(ours() - set(rows))}"
    assert set(rows) - {"benchmarks/"} <= ours(), "rows for files that do not exist"


@pytest.mark.parametrize("module", sorted(ours()))
def test_a_module_imports_only_what_its_row_allows(module):
    extra = imports_of(REPO / f"{module}.py") - allowed_imports()[module]
    assert not extra, f"{module}.py imports {sorted(extra)}, which its README row does not allow"


def test_library_modules_import_only_modules_above_them_and_no_script():
    order = [cells[0].strip("`").removesuffix(".py") for cells in table_rows()]
    for position, module in enumerate(order):
        if module in ours() and not is_script(module):
            below = set(order[position:])
            assert not imports_of(REPO / f"{module}.py") & below, f"{module}.py imports a module at or below its row"


def test_only_the_results_script_imports_other_scripts():
    for module in ours():
        scripts = {name for name in imports_of(REPO / f"{module}.py") if is_script(name)}
        assert not scripts or module == "run_synthetic_results", f"{module}.py imports {sorted(scripts)}"


def test_benchmarks_import_library_modules_only():
    for path in (REPO / "benchmarks").glob("*.py"):
        scripts = {name for name in imports_of(path) if is_script(name)}
        assert not scripts, f"{path.name} imports {sorted(scripts)}"
