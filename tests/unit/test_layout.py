"""The import rules of STYLE.md: tm/core is pure (stdlib, msgspec and tm.errors only)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "tm" / "core"
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
    import subprocess

    code = (
        "import sys, tm.worker, tm.api.server, tm.pipeline, tm.__main__; "
        "sys.exit(1 if 'redis' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
