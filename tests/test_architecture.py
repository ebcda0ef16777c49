"""The package's import structure: no import cycle, and the deploy path free of training code.

The same rules as the import-linter contracts in ``pyproject.toml`` (``lint-imports``, run by CI), checked here
with import-linter's own graph library so that a developer running pytest sees a broken rule, with the modules
named. Imports under ``if TYPE_CHECKING:`` never run and are left out, as in the contracts.

The ``bin/`` scripts import the package as installed (no ``sys.path`` edits, no script loaded from its file), and
each is linted: ruff picks files by suffix, and these have none.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import grimp
import pytest
from conftest import REPO

PACKAGE = "sct_sitehead"
#: What ``sct_deepseg_lesion`` runs, installed without the ``train`` extra.
DEPLOY_SIDE = ("sct_sitehead.deploy", "sct_sitehead.registry", "sct_sitehead.cli.deepseg_lesion")
FORBIDDEN_ON_DEPLOY_SIDE = (
    "sct_sitehead.training",
    "sct_sitehead.simulate",
    "sct_sitehead.evaluation",
    "torch",
    "onnx",
    "monai",
)


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(
        PACKAGE, include_external_packages=True, exclude_type_checking_imports=True, cache_dir=None
    )


def import_cycles(graph: grimp.ImportGraph, package: str = PACKAGE) -> list[list[str]]:
    """The strongly connected components of more than one module among ``package``'s modules (Tarjan).

    Returns:
        each component's modules, sorted; the components sorted by their first module.
    """
    modules = sorted(m for m in graph.modules if _inside(m, package))
    successors = {
        m: sorted(n for n in graph.find_modules_directly_imported_by(m) if _inside(n, package)) for m in modules
    }
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        on_stack.add(module)
        for successor in successors[module]:
            if successor not in order:
                visit(successor)
                low[module] = min(low[module], low[successor])
            elif successor in on_stack:
                low[module] = min(low[module], order[successor])
        if low[module] == order[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in modules:
        if module not in order:
            visit(module)
    return sorted(components)


def describe_cycle(graph: grimp.ImportGraph, component: Iterable[str]) -> str:
    """The imports inside one cycle, one per line: ``a.b (line 12) imports a.c``."""
    members = set(component)
    lines = []
    for importer in sorted(members):
        for imported in sorted(graph.find_modules_directly_imported_by(importer) & members):
            details = graph.get_import_details(importer=importer, imported=imported)
            where = ", ".join(str(d["line_number"]) for d in details) or "?"
            lines.append(f"  {importer} (line {where}) imports {imported}")
    return "\n".join(lines)


def bin_python_scripts() -> list[Path]:
    """The Python scripts of ``bin/``; they have no ``.py`` suffix, so their ``#!`` line tells them."""
    scripts = []
    for path in sorted((REPO / "bin").iterdir()):
        first = path.read_text(encoding="utf-8").partition("\n")[0] if path.is_file() else ""
        if first.startswith("#!") and "python" in first:
            scripts.append(path)
    return scripts


#: Ways to load a file as a module behind the import system's back.
FILE_LOADERS = {"SourceFileLoader", "spec_from_file_location", "run_path", "runpy"}


def path_hacks(source: str) -> list[int]:
    """The lines of a script that reach around the installed package: a ``sys.path`` edit, or a file loaded as a
    module (:data:`FILE_LOADERS`)."""
    lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "path" and ast.unparse(node.value) == "sys":
            lines.add(node.lineno)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if {alias.name.split(".")[-1] for alias in node.names} & FILE_LOADERS:
                lines.add(node.lineno)
        elif (isinstance(node, ast.Name) and node.id in FILE_LOADERS) or (
            isinstance(node, ast.Attribute) and node.attr in FILE_LOADERS
        ):
            lines.add(node.lineno)
    return sorted(lines)


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_package_has_no_import_cycle(graph: grimp.ImportGraph) -> None:
    cycles = import_cycles(graph)
    report = "\n".join(f"cycle among {', '.join(c)}:\n{describe_cycle(graph, c)}" for c in cycles)
    assert not cycles, f"import cycles; move what the modules share into a module below them both\n{report}"


def test_no_module_imports_the_package_root(graph: grimp.ImportGraph) -> None:
    """The root (``sct_sitehead/__init__.py``) imports the public API, so a module that imports it back (for
    ``__version__``, say: take it from :mod:`sct_sitehead.version`) closes a cycle through the API."""
    importers = sorted(m for m in graph.find_modules_that_directly_import(PACKAGE) if _inside(m, PACKAGE))
    assert not importers, f"these modules import the package root {PACKAGE}: {importers}"


@pytest.mark.parametrize("source", DEPLOY_SIDE)
def test_the_deploy_side_imports_no_training_code(graph: grimp.ImportGraph, source: str) -> None:
    chains = []
    for forbidden in FORBIDDEN_ON_DEPLOY_SIDE:
        if forbidden in graph.modules:
            chains += sorted(graph.find_shortest_chains(importer=source, imported=forbidden, as_packages=True))
    listing = "\n".join("  " + " -> ".join(chain) for chain in chains)
    assert not chains, f"{source} must run without the train extra, yet imports:\n{listing}"


def test_import_cycles_are_found_and_named() -> None:
    """The cycle finder itself, on a hand-made graph: a three-module cycle and a two-module one, named; a chain,
    a self-import and a cycle through another package are not package cycles."""
    graph = grimp.ImportGraph()
    for importer, imported in [
        ("p.a", "p.b"),
        ("p.b", "p.c"),
        ("p.c", "p.a"),
        ("p.d", "p.e"),
        ("p.e", "p.d"),
        ("p.f", "p.a"),
        ("p.g", "p.g"),
        ("p.h", "q.x"),
        ("q.x", "p.h"),
    ]:
        graph.add_import(importer=importer, imported=imported, line_number=1, line_contents=f"import {imported}")
    assert import_cycles(graph, "p") == [["p.a", "p.b", "p.c"], ["p.d", "p.e"]]
    assert describe_cycle(graph, ["p.d", "p.e"]) == "  p.d (line 1) imports p.e\n  p.e (line 1) imports p.d"


def test_bin_scripts_import_the_package_as_installed() -> None:
    """``bin/`` scripts use the public API and the package's modules as a user would: no ``sys.path`` edits, no
    other script loaded from its file."""
    scripts = bin_python_scripts()
    assert len(scripts) >= 9, [path.name for path in scripts]
    hacks = {path.name: path_hacks(path.read_text(encoding="utf-8")) for path in scripts}
    assert not {name: lines for name, lines in hacks.items() if lines}, "sys.path edits or file loaders, by line"


def test_path_hacks_are_found() -> None:
    source = """import sys
sys.path.insert(0, "bin")
from importlib.machinery import SourceFileLoader
import os.path
other = importlib.machinery.SourceFileLoader("b", "bin/b").load_module()
import runpy
print(os.path.join("a", "b"), sys.argv)
"""
    assert path_hacks(source) == [2, 3, 5, 6]


def test_ruff_checks_every_python_script_of_bin() -> None:
    """ruff picks files by suffix, so a script without ``.py`` is linted and formatted only when pyproject names
    it; a new script left out would escape CI's ``ruff check .`` and ``ruff format --check .``."""
    tomllib = pytest.importorskip("tomllib")
    ruff = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["ruff"]
    named = set(ruff["extend-include"])
    assert {f"bin/{path.name}" for path in bin_python_scripts()} <= named
