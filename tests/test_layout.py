"""The "Where things are" tables (``docs/design.md``) are the layout: every module (a file at the root or in one
of the packages) has a row, imports only what its row allows, and the imports form no cycle; no
library module imports a ``run_*`` script; the root holds at most 18 files, and a test imports the
shared helpers, never another test."""
import ast
import re
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "image_data", "evaluation")
LIBRARY = "library modules"
MAX_ROOT_FILES = 18
DESIGN = "docs/design.md"  # where the "Where things are" tables live; the README links to it


def table_rows() -> List[List[str]]:
    """The cells of the "Where things are" tables (``docs/design.md``), one list per row, in order."""
    readme = (REPO / DESIGN).read_text()
    section = readme.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def module_name(path: Path) -> str:
    """``training/loop.py`` -> ``training.loop``."""
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def module_files() -> Dict[str, Path]:
    files = {path.stem: path for path in REPO.glob("*.py")}
    for package in PACKAGES:
        files.update({module_name(path): path for path in (REPO / package).glob("*.py") if path.stem != "__init__"})
    return files


def ours() -> Set[str]:
    return set(module_files())


def is_script(name: str) -> bool:
    return name.startswith("run_")


def imports_of(path: Path) -> Set[str]:
    """The repository modules ``path`` imports, at any depth of its code: ``from training.loop import
    fit``, ``from training import loop`` and ``import training.loop`` all name ``training.loop``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & ours()


def row_name(cell: str) -> str:
    """A row's first cell, ``training/loop.py``, as a module name."""
    return cell.strip("`").removesuffix(".py").replace("/", ".")


def allowed_imports() -> Dict[str, Set[str]]:
    """Row file -> the modules its last cell allows: named ones, "nothing", or "library modules"
    (every module that is not a script), with "the `run_*` scripts" adding the scripts."""
    allowed = {}
    for cells in table_rows():
        name = row_name(cells[0])
        rule = cells[-1]
        names = set(re.findall(r"`([a-z_.]+)`", rule))
        if LIBRARY in rule:
            names |= {module for module in ours() if not is_script(module)}
        if "`run_*`" in rule:
            names |= {module for module in ours() if is_script(module)}
        allowed[name] = names - {name}
    return allowed


def test_every_module_has_a_row():
    rows = allowed_imports()
    assert ours() <= set(rows), f"modules missing from the README tables: {sorted(ours() - set(rows))}"
    assert set(rows) - {"benchmarks."} <= ours(), f"rows for files that do not exist: {sorted(set(rows) - ours())}"


@pytest.mark.parametrize("module", sorted(ours()))
def test_a_module_imports_only_what_its_row_allows(module):
    extra = imports_of(module_files()[module]) - allowed_imports()[module]
    assert not extra, f"{module} imports {sorted(extra)}, which its README row does not allow"


def test_the_library_imports_form_no_cycle():
    """Imports point one way: library modules can be ordered so that each imports only earlier ones."""
    remaining = {name: imports_of(path) for name, path in module_files().items() if not is_script(name)}
    while remaining:
        ready = [name for name, needs in remaining.items() if not needs & set(remaining)]
        assert ready, f"an import cycle among {sorted(remaining)}"
        for name in ready:
            del remaining[name]


def test_only_the_results_script_imports_other_scripts():
    for module, path in module_files().items():
        scripts = {name for name in imports_of(path) if is_script(name)}
        if not is_script(module):
            assert not scripts, f"library module {module} imports {sorted(scripts)}"
        assert not scripts or module == "run_synthetic_results", f"{module} imports {sorted(scripts)}"


def test_the_root_shows_the_shape_of_mae():
    root = sorted(path.name for path in REPO.glob("*.py"))
    assert len(root) <= MAX_ROOT_FILES, root
    for required in ("run_mae_pretraining.py", "run_class_finetuning.py", "modeling_pretrain.py",
                     "modeling_finetune.py", "engine_for_pretraining.py", "engine_for_finetuning.py", "datasets.py",
                     "masking_generator.py", "utils.py", "optim_factory.py"):
        assert required in root


MAX_LINES = 400  # a file longer than this does more than one job
WHOLE_NAMESPACE_ALLOWED = {
    # the scripts' harness: it hands the parsed command line to the script's own main, and reads
    # --output_dir and --auto_resume only for the one line it prints after a Ctrl-C before training
    "utils.exit_on_usage_error",
    # argparse's own method, overridden to read --config first: it makes the command line, reads none of it
    "training.config_file.parse_known_args",
}


def is_entry_point(module: str) -> bool:
    """A script (``run_*``, or a root tool with a ``__main__`` block) or the resolver: they may read the whole
    command line; the library takes the settings of its part."""
    path = module_files()[module]
    return is_script(module) or module == "training.config" or "__main__" in path.read_text()


def takes_the_whole_namespace(function: ast.FunctionDef) -> bool:
    """A parameter named ``args`` or annotated as an ``argparse.Namespace`` (or ``ResolvedArgs``)."""
    parameters = function.args.posonlyargs + function.args.args + function.args.kwonlyargs
    annotations = [ast.unparse(parameter.annotation) for parameter in parameters if parameter.annotation]
    return any(parameter.arg == "args" for parameter in parameters) or any(
        "Namespace" in annotation or "ResolvedArgs" in annotation for annotation in annotations)


def test_library_functions_take_their_settings_not_the_whole_command_line():
    """Each part says what it reads: outside the entry points and ``training.config`` a function is
    handed its typed settings or plain values, never the whole command line (save the harness)."""
    whole = set()
    for module, path in module_files().items():
        if is_entry_point(module):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and takes_the_whole_namespace(node):
                whole.add(f"{module}.{node.name}")
    assert whole == WHOLE_NAMESPACE_ALLOWED, f"these take the whole namespace: {sorted(whole - WHOLE_NAMESPACE_ALLOWED)}"


def test_the_loop_knows_no_task():
    """The stage says what its best is and how its line reads: the loop names no accuracy."""
    source = (REPO / "training" / "loop.py").read_text()
    assert not re.search(r"accura|\bacc\d|top-?\d|max_acc", source, re.IGNORECASE)


def test_no_file_is_longer_than_a_reader_can_hold():
    python_files = [path for folder in (REPO, *(REPO / name for name in (*PACKAGES, "tests", "benchmarks")))
                    for path in folder.glob("*.py")]
    long = {str(path.relative_to(REPO)): lines for path in python_files
            if (lines := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_benchmarks_import_library_modules_only():
    for path in (REPO / "benchmarks").glob("*.py"):
        scripts = {name for name in imports_of(path) if is_script(name)}
        assert not scripts, f"{path.name} imports {sorted(scripts)}"


def test_tests_share_helpers_through_one_module():
    tests = {path.stem for path in (REPO / "tests").glob("test_*.py")}
    for path in (REPO / "tests").glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
        assert not imported & tests, f"{path.name} imports {sorted(imported & tests)}: share it through helpers.py"


DIST_COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "barrier", "init_process_group", "new_group",
                    "all_gather_object", "broadcast_object_list", "reduce_scatter", "reduce_scatter_tensor"}
SAYS_COLLECTIVE = re.compile(r"collective|every rank|all ranks|over ranks|each rank", re.IGNORECASE)
NAMED_COLLECTIVE = re.compile(r"all_ranks|all_reduce|all_gather|barrier|broadcast|agree")
ENTRY_POINTS = {"main", "run"}  # a script's main and run are where every rank starts


def direct_collectives(function: ast.FunctionDef) -> bool:
    """Whether ``function`` itself calls ``dist.<collective>``, ``.full_tensor()`` or DCP's
    ``save``/``load`` within a process group (``no_dist=True`` reads in one process)."""
    for node in ast.walk(function):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        if owner == "dist" and node.func.attr in DIST_COLLECTIVES or node.func.attr == "full_tensor":
            return True
        if owner == "dcp" and not any(k.arg == "no_dist" for k in node.keywords):
            return True
    return False


def resolver(module: str, tree: ast.Module) -> Dict[str, str]:
    """Names in ``module`` -> what of ours they mean: ``from utils import barrier`` makes
    ``barrier`` "utils.barrier", ``from training import checkpoint`` makes ``checkpoint``
    "training.checkpoint", and the module's own functions are "module.name"."""
    names = {node.name: f"{module}.{node.name}" for node in tree.body if isinstance(node, ast.FunctionDef)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            names.update({alias.asname or alias.name: alias.name for alias in node.names})
    return names


def callee(call: ast.Call, names: Dict[str, str]) -> str:
    """``f(...)`` or ``module.f(...)`` as "module.f" when it is ours; '' otherwise."""
    if isinstance(call.func, ast.Name):
        return names.get(call.func.id, "")
    if isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name):
        owner = names.get(call.func.value.id, "")
        return f"{owner}.{call.func.attr}" if owner in ours() else ""
    return ""


def test_every_function_that_runs_a_collective_says_so():
    """A collective that one rank skips hangs the others under NCCL, so its callers must know:
    a module-level function's name or the first paragraph of its docstring says so when it runs
    a collective itself or through the functions of ours it calls."""
    calls, docs = {}, {}
    for module, path in module_files().items():
        tree = ast.parse(path.read_text())
        names = resolver(module, tree)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                key = f"{module}.{node.name}"
                inner = {callee(call, names) for call in ast.walk(node) if isinstance(call, ast.Call)}
                calls[key] = (direct_collectives(node), inner - {""})
                docs[key] = (ast.get_docstring(node) or "").split("\n\n")[0]
    collective = {key for key, (direct, _) in calls.items() if direct}
    while True:
        more = {key for key, (_, inner) in calls.items() if key not in collective and inner & collective}
        if not more:
            break
        collective |= more
    silent = [key for key in collective if key.rsplit(".", 1)[1] not in ENTRY_POINTS
              and not NAMED_COLLECTIVE.search(key.rsplit(".", 1)[1]) and not SAYS_COLLECTIVE.search(docs[key])]
    assert not silent, f"these run a collective without saying so: {sorted(silent)}"


PAGES = ("README.md", "docs/*.md", "benchmarks/RESULTS.md")
README_LINES = 200  # the README is read in five minutes; the rest is in docs/


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_pages_leads_somewhere():
    """Each relative link of the README, the docs pages and the results page names a file that
    exists, and its ``#anchor`` a heading of that page."""
    broken = []
    for pattern in PAGES:
        for page in REPO.glob(pattern):
            for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
                if re.match(r"[a-z]+:", target):
                    continue
                path, _, anchor = target.partition("#")
                linked = (page.parent / path).resolve() if path else page
                if not linked.exists():
                    broken.append(f"{page.relative_to(REPO)}: {target}")
                elif anchor and linked.suffix == ".md":
                    headings = re.findall(r"(?m)^#+ (.+)$", linked.read_text())
                    if anchor not in {heading_anchor(heading) for heading in headings}:
                        broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_is_short_and_maps_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_LINES
    for page in (REPO / "docs").glob("*.md"):
        assert f"](docs/{page.name})" in readme, f"the README's map lacks docs/{page.name}"
