"""The wheel is a complete install: built from this checkout (sdist, then the wheel from it, as a
release is built), installed into a fresh virtual environment outside the checkout with its
runtime dependencies at uv.lock's versions, it migrates a fresh database and passes `tm check`,
run from a directory where nothing of the checkout can be imported.
"""

from __future__ import annotations

import os
import subprocess
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest

from harness.stack import Stack
from tm.adapters import migrations

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def run(
    args: list[str | Path], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(arg) for arg in args],
        env=dict(env if env is not None else os.environ),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tm's wheel, built by `uv build` with the build backend pinned in pyproject.toml."""
    uv = run(["bash", ROOT / "stack" / "uv.sh"]).stdout.strip()
    dist = tmp_path_factory.mktemp("dist")
    run([uv, "build", "--quiet", "--out-dir", dist, ROOT])
    (built,) = dist.glob("tm-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel and uv.lock's runtime dependencies only."""
    uv = run(["bash", ROOT / "stack" / "uv.sh"]).stdout.strip()
    place = tmp_path_factory.mktemp("install")
    requirements = place / "requirements.txt"
    run(
        [
            uv,
            "export",
            "--project",
            ROOT,
            "--frozen",
            "--no-emit-project",
            "--quiet",
            "--format",
            "requirements-txt",
            "-o",
            requirements,
        ]
    )
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    env.pop("VIRTUAL_ENV", None)
    run([uv, "venv", "--quiet", "--python", "python3", place / "venv"], env=env)
    python = place / "venv" / "bin" / "python"
    run(
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            python,
            "--require-hashes",
            "-r",
            requirements,
        ],
        env=env,
    )
    run([uv, "pip", "install", "--quiet", "--python", python, "--no-deps", wheel], env=env)
    return place / "venv"


def test_the_wheel_holds_every_migration_of_the_checkout(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        shipped = sorted(name for name in archive.namelist() if name.startswith("tm/sql/"))
    assert shipped
    assert shipped == sorted(f"tm/sql/{path.name}" for path in migrations.SQL_DIR.glob("*.sql"))


def test_the_installed_wheel_migrates_a_fresh_database_and_passes_check(
    venv: Path, database: str, stack: Stack, tmp_path: Path
) -> None:
    # Outside the checkout, with nothing of it on the path: only the installed package runs.
    # The stack gives the topics; the database is a fresh one of its own, never migrated.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(stack.env)
    env["POSTGRES_DB"] = database
    tm = venv / "bin" / "tm"
    where = run(
        [venv / "bin" / "python", "-c", "import tm.adapters.migrations as m; print(m.SQL_DIR)"],
        env=env,
        cwd=tmp_path,
    ).stdout.strip()

    migrated = run([tm, "db", "migrate"], env=env, cwd=tmp_path)
    again = run([tm, "db", "migrate"], env=env, cwd=tmp_path)
    checked = run([tm, "check"], env=env, cwd=tmp_path)

    assert Path(where).is_relative_to(venv)
    assert migrated.stdout.splitlines() == [
        f"applied {m.version:04d}_{m.name}" for m in migrations.discover()
    ]
    assert again.stdout.splitlines() == ["schema is up to date; nothing to apply"]
    postgres_line, kafka_line = checked.stdout.splitlines()
    assert postgres_line.startswith("postgres: reached in ")
    assert postgres_line.endswith(", schema migrated")
    assert kafka_line.startswith("kafka: reached in ")
    assert "missing" not in kafka_line
