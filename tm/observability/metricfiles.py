"""The directory of metric files that the processes of ``tm run`` share, on the supervisor's side.

prometheus-client's multiprocess mode keeps each process's values in files under
``PROMETHEUS_MULTIPROC_DIR``, which the library reads from the environment when a child first
imports it. The supervisor empties (or makes) the directory before the first fork and puts it in
its environment for the children; it imports no metric itself (a value it wrote would be
inherited by every child it forks later), only prometheus-client's bookkeeping of dead processes.
The metrics are declared in :mod:`tm.observability.metrics`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

ENV = "PROMETHEUS_MULTIPROC_DIR"  # set here for the children; read only by tm.config (and them)


@contextlib.contextmanager
def directory(configured: str | None) -> Iterator[str]:
    """An empty directory for the metric files, exported as ``PROMETHEUS_MULTIPROC_DIR``.

    The operator's (``configured``, from the settings) is made if missing, emptied of metric
    files and kept; without one a temporary directory is made, and removed on exit."""
    if configured:
        os.makedirs(configured, exist_ok=True)
        for name in os.listdir(configured):
            if name.endswith(".db"):
                os.remove(os.path.join(configured, name))
        os.environ[ENV] = configured
        yield configured
        return
    made = tempfile.mkdtemp(prefix="tm-metrics-")
    os.environ[ENV] = made
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


def forget(pid: int, path: str) -> None:
    """Drop the live gauges of a child that exited (its counters stay in the sums)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
