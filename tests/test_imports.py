"""The package's modules import each other without a cycle, counting every intra-package import:
at the top of a module and inside functions, so a cycle cannot hide in a function body. Reading a
recipe and asking the CLI for help load no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dataselect
from dataselect.selectors import SELECTORS

PACKAGE = Path(dataselect.__file__).parent
NAME = "dataselect"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (`from ..x import y` inside `importer`)."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every module of the package that the file at `path` imports, anywhere in it."""
    importer = _module_name(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(importer, path.name == "__init__.py", node)
            for alias in node.names:  # `from . import x` imports module x, `from . import build` the package
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module)
    return {m for m in found if m in modules and m != importer}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): imports_of(f, modules) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None: a depth-first search that keeps the current path."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once every edge out was followed
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "dataselect.sketch" in graph["dataselect.select"]  # also imported inside gradient_similarity
    assert "dataselect.pipeline" in graph["dataselect"]  # from .pipeline import ...
    assert len(graph) > 20


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_selector_names_a_scoring_function():
    """The registry refers to its scoring functions by name (the recipe must not import torch):
    each name resolves."""
    for selector in SELECTORS.values():
        assert callable(selector.score()), selector.name


def test_a_stage_receives_what_it_reads_and_looks_for_no_other_folder():
    """Each stage's function takes the outputs its `reads` names, all from earlier stages, and no
    stage module opens a run folder itself (`recipe.run`): what a stage reads is in its signature.
    The run's fine-tune cache (`recipe.run.finetunes`) is no stage's output: the confirm stage
    trains into it, as verify does."""
    import inspect

    from dataselect.pipeline import STAGE_NAMES, STAGES

    for index, stage in enumerate(STAGES):
        assert set(stage.reads) <= set(STAGE_NAMES[:index]), stage.name
        for function, fixed in ((stage.run, 2), (stage.shard, 3)):
            if function is not None:
                assert len(inspect.signature(function).parameters) == fixed + len(stage.reads), function
        source = (PACKAGE / f"{stage.run.__module__.rsplit('.', 1)[1]}.py").read_text(encoding="utf-8")
        source = source.replace("recipe.run.finetunes", "")
        assert "recipe.run." not in source and ".run_dir /" not in source, stage.name


def _loaded(code: str) -> set[str]:
    """The top-level packages a fresh interpreter has imported once it has run `code`, as
    `python -X importtime` lists them (the measure the CLI's start-up is judged by)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line.split("|") for line in done.stderr.splitlines() if line.startswith("import time:")]
    return {parts[-1].strip().split(".")[0] for parts in lines if len(parts) == 3}


ML = {"torch", "transformers", "datasets", "peft", "faiss"}


def test_the_import_listing_sees_what_is_loaded():
    """So that the tests below cannot pass by reading an empty listing (the store needs numpy,
    which is quicker to load than torch)."""
    assert {"numpy", "dataselect"} <= _loaded("import dataselect.store")


@pytest.mark.parametrize("code", ["import dataselect.recipe", "import dataselect", "import dataselect.cli"])
def test_reading_a_recipe_or_loading_the_cli_imports_no_torch(code):
    loaded = _loaded(code)
    assert "dataselect" in loaded and not loaded & ML, sorted(loaded & ML)


def test_the_cli_help_loads_no_stage_module():
    """`dataselect --help` and a stage command's help build every command from the stage table and
    the selectors' registry: no stage module, so neither torch nor numpy nor polars, which would
    make every invocation wait for them."""
    code = ("from dataselect.cli import main\n"
            "for args in (['--help'], ['sketch', '--help'], ['build', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit as done:\n        assert done.code == 0, args\n")
    heavy = _loaded(code) & (ML | {"numpy", "polars", "matplotlib"})
    assert not heavy, sorted(heavy)
