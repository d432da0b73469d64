"""The one harness of the tests and the benches, on the running local stack: fresh databases
and topics (:mod:`harness.stack`), ``tm run`` as a process (:mod:`harness.tm`), producers and
readers of Kafka (:mod:`harness.kafka`), samples of ``/proc`` (:mod:`harness.procfs`), the
fault proxy (:mod:`harness.proxy`), what a run of tasks must leave behind
(:mod:`harness.outcomes`) and the facts a report prints (:mod:`harness.report`). A test module
or a bench keeps only its scenario.

Here: the small helpers all of them share.
"""

from __future__ import annotations

import signal
import socket
import time
import uuid
from collections.abc import Callable
from typing import Literal, TypeVar

T = TypeVar("T")
WAIT_POLL_S = 0.2  # how often wait_for looks again


class HarnessError(Exception):
    """A run cannot go on: tm died, a deadline passed, a producer was refused."""


def unique(prefix: str) -> str:
    """A name nobody else uses (other engineers run tests on the same servers)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    """A TCP port nobody listens on right now (for a tm's API, so that runs can overlap)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers(host: str, port: int) -> bool:
    """Something listens on host:port."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def stop_on_sigterm() -> None:
    """A SIGTERM unwinds like Ctrl-C does, through the finally blocks: the cleanup runs."""
    signal.signal(signal.SIGTERM, _raise_on_sigterm)


def _raise_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def wait_for(
    condition: Callable[[], T | Literal[False] | None],
    *,
    timeout_s: float = 30.0,
    interval_s: float = WAIT_POLL_S,
    what: str = "",
) -> T:
    """Poll ``condition`` until it returns a truthy value; an AssertionError at the deadline
    (the test fails with what it waited for)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:.0f} s waiting for {what or condition}"
            )
        time.sleep(interval_s)
