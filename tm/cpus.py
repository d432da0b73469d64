"""The CPUs this process may use: its affinity mask and its cgroup's CPU quota.

In a container ``os.cpu_count()`` is the node's CPU count (32 on a large node), not the pod's
limit. The quota is read from ``/proc/self/cgroup`` and the cgroup filesystem below a root
path, so that tests pass a fake tree.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# Where cgroup v2 is mounted: alone (unified layout), or beside the v1 controllers (hybrid).
_CGROUP_V2_MOUNTS = ("sys/fs/cgroup", "sys/fs/cgroup/unified")
# Where the v1 "cpu" controller is mounted, alone or co-mounted with cpuacct.
_CGROUP_V1_CPU_MOUNTS = (
    "sys/fs/cgroup/cpu",
    "sys/fs/cgroup/cpu,cpuacct",
    "sys/fs/cgroup/cpuacct,cpu",
)


def usable(*, root: Path = Path("/"), affinity: int | None = None) -> int:
    """The smaller of the affinity mask (``affinity`` CPUs, read when None) and the cgroup CPU
    quota rounded up (:func:`cgroup_cpu_limit`), at least 1."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        affinity = affinity or os.cpu_count() or 1
    quota = cgroup_cpu_limit(root)
    return max(1, affinity if quota is None else min(affinity, quota))


def cgroup_cpu_limit(root: Path) -> int | None:
    """The CPU quota of this process's cgroups in whole CPUs (rounded up), or None if none.

    ``root`` is ``/`` except in tests. The cgroups come from ``proc/self/cgroup``; for each one
    the quota of the cgroup and of every ancestor counts (a parent's quota limits its
    children, and inside a container without a cgroup namespace the path named there does not
    exist below the mount, whose root is the container's own cgroup). cgroup v2: ``cpu.max``,
    ``"max 100000"`` (none) or ``"200000 100000"`` (2 CPUs); v1: ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``, -1 for none. A file missing or unreadable counts as no quota."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    limits: list[int] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and not controllers:
            for mount in _CGROUP_V2_MOUNTS:
                limits += filter(None, map(_cpu_max, _cgroup_dirs(root / mount, path)))
        elif "cpu" in controllers.split(","):
            for mount in _CGROUP_V1_CPU_MOUNTS:
                limits += filter(None, map(_cfs_quota, _cgroup_dirs(root / mount, path)))
    return min(limits) if limits else None


def _cgroup_dirs(mount: Path, path: str) -> Iterator[Path]:
    """The cgroup at ``path`` below ``mount``, then each of its ancestors up to the mount."""
    parts = [part for part in path.split("/") if part and part not in (".", "..")]
    for depth in range(len(parts), -1, -1):
        yield mount.joinpath(*parts[:depth])


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _whole_cpus(quota: str, period: str) -> int | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None  # "max", or garbage
    return -(-q // p) if q > 0 and p > 0 else None  # rounded up, in integers


def _cpu_max(directory: Path) -> int | None:
    text = _read(directory / "cpu.max")
    fields = text.split() if text else []
    return _whole_cpus(fields[0], fields[1]) if len(fields) == 2 else None


def _cfs_quota(directory: Path) -> int | None:
    quota = _read(directory / "cpu.cfs_quota_us")
    period = _read(directory / "cpu.cfs_period_us")
    return _whole_cpus(quota, period) if quota and period else None
