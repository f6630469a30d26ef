"""The import directions of the layout: the CLI -> cluster -> trainer -> data_pipeline, never back; the models
know nothing of the project; nothing imports the CLI (it calls the code, the code never calls it)."""

import ast
import graphlib
from pathlib import Path

import pytest
from checkout import ROOT

PACKAGES = ("cluster", "trainer", "data_pipeline")
CLI = "trainer.cli"
LAYERS = {"cluster": 2, "trainer": 1, "data_pipeline": 0}  # a module imports from its layer and those below


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.split(".")[0] in PACKAGES}


def is_within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


MODULES = {module_name(path): project_imports(path) for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def test_the_modules_are_found():
    assert {"trainer.training.loop", "trainer.cli", "cluster.slurm", "data_pipeline.dali.loader"} <= MODULES.keys()


@pytest.mark.parametrize("module", sorted(name for name in MODULES if not is_within(name, CLI)))
def test_imports_point_down_the_layers(module):
    layer = LAYERS[module.split(".")[0]]
    upward = sorted(name for name in MODULES[module] if LAYERS[name.split(".")[0]] > layer)
    assert not upward, f"{module} imports {upward}, a layer above it"
    callers = sorted(name for name in MODULES[module] if is_within(name, CLI))
    assert not callers, f"{module} imports the CLI ({callers}); call trainer.entry or the function the CLI calls"


@pytest.mark.parametrize("module", sorted(name for name in MODULES if is_within(name, "trainer.models")))
def test_the_models_know_nothing_of_the_project(module):
    outside = sorted(name for name in MODULES[module] if not is_within(name, "trainer.models"))
    assert not outside, f"{module} imports {outside}"


def imported_modules(module: str) -> set[str]:
    """The project modules ``module`` imports, each name resolved to the module that defines it (``from a.b import
    c`` is module a.b, or a.b.c where that is a module); a package's ``__init__`` run on the way is not counted."""
    found = set()
    for name in MODULES[module]:
        while name not in MODULES:
            name = name.rpartition(".")[0]
        if name != module:
            found.add(name)
    return found


def test_no_module_imports_itself_through_others():
    """Not even inside a function: a function-local import that closes a cycle only hides it."""
    graph = {module: imported_modules(module) for module in MODULES}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"an import cycle: {' -> '.join(error.args[1])}")


def tallest_chain(modules: set[str]) -> list[str]:
    """The longest chain of imports among ``modules``, each importing the next (the tower's floors)."""
    graph = {module: imported_modules(module) & modules for module in modules}
    below: dict[str, list[str]] = {}
    for module in graphlib.TopologicalSorter(graph).static_order():  # the modules it imports come first
        below[module] = [module, *max((below[name] for name in graph[module]), key=len, default=[])]
    return max(below.values(), key=len)


# trainer/ less its commands (cli, bench), which sit on top of it
TRAINER = {name for name in MODULES if is_within(name, "trainer") and not is_within(name, CLI)}
TRAINER -= {name for name in MODULES if is_within(name, "trainer.bench")}


def test_the_trainers_import_tower_has_at_most_ten_floors():
    """A reader follows at most ten modules down from the entry point to the config; ``python
    tests/test_layering.py`` prints the tallest chain, of trainer/ and of the whole project."""
    chain = tallest_chain(TRAINER)
    assert len(chain) <= 10, " -> ".join(chain)


if __name__ == "__main__":
    for modules in (TRAINER, set(MODULES)):
        chain = tallest_chain(modules)
        print(f"{len(chain)} floors: {' -> '.join(chain)}")
