"""Fixtures of the container tests: the image of `make image` (built by stack/image.sh when
missing or out of date), a podman that can run it here, and a fresh stack per test.

The tests skip only where podman cannot run at all (`podman info` fails: no user namespaces,
no storage driver, ...); a failing build or a container that misbehaves fails them.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.stack import Stack, make_stack
from tm.config import Settings

ROOT = Path(__file__).resolve().parents[2]
# crun refuses this machine's hybrid cgroup layout; runc is what Debian's podman also ships.
PODMAN = ("podman", "--runtime", "runc")


def _ulimits() -> tuple[str, ...]:
    """podman (rootful) gives a container nofile and nproc limits of 1048576 unless told
    otherwise, which fails here ("error setting rlimit": no CAP_SYS_RESOURCE to raise them):
    the limits this process has instead, as a kubelet's containers inherit the runtime's. runc
    cannot set nproc above the kernel's pid_max (podman lowers its own to that)."""
    _, nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    _, nproc = resource.getrlimit(resource.RLIMIT_NPROC)
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    if nproc == resource.RLIM_INFINITY or nproc > pid_max:
        nproc = pid_max
    nofile = 1048576 if nofile == resource.RLIM_INFINITY else nofile
    return ("--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}")


@dataclasses.dataclass(frozen=True)
class Podman:
    image: str
    ulimits: tuple[str, ...]

    def run(self, *args: str, timeout_s: float = 120, check: bool = True) -> str:
        done = subprocess.run(
            [*PODMAN, *args], capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if check:
            assert done.returncode == 0, f"podman {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done.stdout

    def inspect(self, kind: str, name: str) -> dict[str, Any]:
        return json.loads(self.run(kind, "inspect", name))[0]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def podman(request: pytest.FixtureRequest) -> Podman:
    """`make image`'s script, its output shown as it goes (the first build on a machine takes
    a few minutes: podman, the debootstrapped base, the wheels), then `podman info`."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\ncontainer tests: bash stack/image.sh (make image)", flush=True)
        built = subprocess.run(
            ["bash", str(ROOT / "stack" / "image.sh")],
            stdout=subprocess.PIPE,
            text=True,
            timeout=1800,
            check=False,
        )
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed and stack/image.sh could not install it")
    info = subprocess.run(
        [*PODMAN, "info"], capture_output=True, text=True, timeout=60, check=False
    )
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here (`podman info` fails): {info.stderr.strip()}")
    assert built.returncode == 0, "stack/image.sh failed (its output is above)"
    return Podman(image=built.stdout.split()[-1], ulimits=_ulimits())


@pytest.fixture
def stack(settings: Settings, pg_up: None, kafka_up: None) -> Iterator[Stack]:
    with make_stack(settings) as made:
        yield made
