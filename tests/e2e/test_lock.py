"""The lock guards every install: `make` refuses a uv.lock that no longer matches pyproject.toml
with one line naming `make lock`, before anything is installed, and accepts the committed one.
Run on a copy of the files the rule reads, as a user's make runs it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
STALE = "uv.lock does not match pyproject.toml: run 'make lock' (and commit uv.lock)"


def lock_check(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(tree), "lock-check"],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The Makefile, pyproject.toml, uv.lock and uv's pin, with the checkout's uv (no install)."""
    for name in ("Makefile", "pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "stack").mkdir()
    for name in ("uv.sh", "uv.txt"):
        shutil.copy(ROOT / "stack" / name, tmp_path / "stack" / name)
    uv = subprocess.run(
        ["bash", str(ROOT / "stack" / "uv.sh")], capture_output=True, text=True, check=True
    ).stdout.strip()
    (tmp_path / ".stack" / "uv" / "bin").mkdir(parents=True)
    (tmp_path / ".stack" / "uv" / "bin" / "uv").symlink_to(uv)
    return tmp_path


def test_the_committed_lock_matches_pyproject(tree: Path) -> None:
    done = lock_check(tree)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_a_stale_lock_stops_make_with_one_line_naming_make_lock(tree: Path) -> None:
    pyproject = tree / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(text.replace('"redis>=', '"six>=1.16",\n    "redis>=', 1))

    done = lock_check(tree)

    assert done.returncode != 0
    assert done.stderr.splitlines()[0] == STALE
    assert (tree / "uv.lock").read_bytes() == (ROOT / "uv.lock").read_bytes()
