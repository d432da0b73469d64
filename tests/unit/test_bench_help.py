"""Every bench and the load tests answer ``--help`` (argparse expands ``%`` in help texts: a
literal one must be doubled, or ``--help`` itself crashes)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "bench.api",
        "bench.cpu",
        "bench.e2e",
        "bench.latency",
        "bench.prune",
        "bench.soak",
        "loadtests",
    ],
)
def test_help_prints_usage(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: ")
