"""The shape the code keeps, checked on its source: short functions, no import circles, the SQL in
the run store's layers, and the boundaries between the training core and the service."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("erpd", "erpd_hub", "server", "worker", "dashboard")
LONGEST_FUNCTION = 80
# what reaches the database: SQLAlchemy's statements and a session's query methods
SQL_NAMES = {"select", "insert", "update", "delete", "text", "func", "with_for_update"}
SQL_METHODS = {"execute", "scalar", "scalars", "get", "query"}
SQL_HOMES = ("server/db/", "server/services/")


def sources(*packages: str) -> Iterator[tuple[str, ast.Module]]:
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            yield rel, ast.parse(path.read_text(), filename=rel)


def module_name(rel: str) -> str:
    name = rel.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def imports_of(rel: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The project modules `rel` imports, at module level or inside a function."""
    here = module_name(rel)
    package = here if rel.endswith("__init__.py") else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            # the longest project module the name is, or lies in
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != here:
                found.add(name)
    return found


def test_no_function_is_longer_than_a_screen() -> None:
    long = [
        f"{rel}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for rel, tree in sources("erpd", "server", "worker")
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION
    ]
    assert long == []


def test_no_module_imports_itself_through_others() -> None:
    trees = dict(sources(*PACKAGES))
    known = {module_name(rel) for rel in trees}
    graph = {module_name(rel): imports_of(rel, tree, known) for rel, tree in trees.items()}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                circles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_sql_lives_in_the_store_and_its_services() -> None:
    outside = []
    for rel, tree in sources("server", "worker", "dashboard", "erpd_hub"):
        if rel.startswith(SQL_HOMES):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
                used = {alias.name for alias in node.names} & SQL_NAMES
                if used:
                    outside.append(f"{rel}:{node.lineno} imports {sorted(used)}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in SQL_METHODS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in {"session", "s", "conn", "connection"}
            ):
                outside.append(f"{rel}:{node.lineno} {node.func.value.id}.{node.func.attr}(...)")
    assert outside == []


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("erpd", ("server", "worker", "dashboard", "erpd_hub")),  # the core knows no service
        ("server", ("torch", "transformers", "worker", "dashboard")),  # the API never loads torch
        ("dashboard", ("sqlalchemy", "server.db", "worker", "torch")),  # it reads the REST API
    ],
)
def test_boundaries(package: str, forbidden: tuple[str, ...]) -> None:
    crossing = []
    for rel, tree in sources(package):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if any(name == f or name.startswith(f"{f}.") for f in forbidden):
                    crossing.append(f"{rel}:{node.lineno} imports {name}")
    assert crossing == []
