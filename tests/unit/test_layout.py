"""The layout rules of STYLE.md: tm/core is pure (stdlib, msgspec and tm.errors only); no import
circle among tm's modules; the Kafka and PostgreSQL clients are imported only under tm/adapters,
and never by the supervisor's process; no module grows past :data:`MAX_MODULE_LINES`."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

TM = Path(__file__).resolve().parents[2] / "tm"
CORE = TM / "core"
ADAPTERS = TM / "adapters"
ALLOWED_THIRD_PARTY = {"msgspec"}
ALLOWED_TM = {"tm.errors", "tm.core"}
FORBIDDEN_STDLIB = {"asyncio", "socket", "threading", "time", "subprocess", "os"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_imports_only_what_it_may() -> None:
    files = sorted(CORE.glob("*.py"))
    assert files, "tm/core has no modules"
    for path in files:
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "tm":
                assert any(name == ok or name.startswith(ok + ".") for ok in ALLOWED_TM), (
                    f"{path.name} imports {name}"
                )
            elif top in sys.stdlib_module_names:
                assert top not in FORBIDDEN_STDLIB, f"{path.name} imports {name} (I/O or clock)"
            else:
                assert top in ALLOWED_THIRD_PARTY, f"{path.name} imports {name}"


def test_no_redis_client_is_imported_without_redis_url() -> None:
    """REDIS_URL unset: nothing of the task-event feed is loaded (DESIGN §11)."""
    code = (
        "import sys, tm.worker, tm.api.server, tm.pipeline, tm.__main__; "
        "sys.exit(1 if 'redis' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- the whole package ---------------------------------------------------------------------------

CLIENT_LIBRARIES = ("confluent_kafka", "asyncpg", "redis")  # imported only under tm/adapters
MAX_MODULE_LINES = 400  # STYLE.md: past about 400 lines, look for a second module inside


def _modules(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root``, by its dotted name (a package by its own)."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _statements(path: Path) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import of a module: at its top, inside functions, under TYPE_CHECKING."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node


def _graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``; ``from a import b`` names the module
    ``a.b`` when there is one, else ``a``."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _statements(path):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan), as the
    path ``[a, b, ..., a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_path_around(graph, component) for component in components]


def _path_around(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest circle through the component's first module, inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no circle through {start}")  # a component always has one


def test_no_import_circle() -> None:
    """Including imports inside functions and under TYPE_CHECKING: a circle that only works
    because one side imports late is still a circle of the design."""
    circles = _circles(_graph(TM))
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def _absolute_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import names, unless it is relative (then it is one of tm's own)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return [node.module] if node.module and node.level == 0 else []


def test_client_libraries_are_imported_only_by_adapters() -> None:
    offenders = sorted(
        f"{path.relative_to(TM.parent)} imports {name}"
        for path in TM.rglob("*.py")
        if ADAPTERS not in path.parents
        for node in _statements(path)
        for name in _absolute_names(node)
        if name.split(".")[0] in CLIENT_LIBRARIES
    )
    assert not offenders, "\n".join(offenders)


def test_the_supervisor_loads_no_client_library() -> None:
    """The parent process forks the workers: librdkafka and asyncpg must not be loaded in it
    (their threads and sockets cannot cross a fork)."""
    code = (
        "import sys, tm.__main__, tm.supervisor; "
        f"print(' '.join(m for m in {CLIENT_LIBRARIES!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []


def test_no_module_is_over_the_line_limit() -> None:
    over = {
        str(path.relative_to(TM.parent)): lines
        for path in sorted(TM.rglob("*.py"))
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"
