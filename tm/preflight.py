"""The pre-flight check of ``tm run``, in a child process, before any worker is forked.

The check itself (PostgreSQL answers, the schema is migrated, the topic exists) is
:func:`tm.commands.preflight`; it loads the Kafka and PostgreSQL clients, whose threads must
not live in the supervisor before it forks. So it runs in a child of its own, which sends its
answer back on a pipe as JSON and exits; the supervisor only waits, and kills the check when a
stop signal comes or when it takes longer than :data:`PREFLIGHT_TIMEOUT_S`.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
from collections.abc import Callable

import msgspec

from tm.config import Settings
from tm.processes import FORK_BLOCKED, kill

PREFLIGHT_TIMEOUT_S = 60.0
POLL_S = 0.5  # how often a stop request is looked at while the check runs


class PreflightInterruptedError(Exception):
    """A stop signal arrived before the workers were started."""


def preflight(settings: Settings, *, stop_requested: Callable[[], bool]) -> tuple[str | None, int]:
    """Check PostgreSQL, the schema and Kafka in a child process (so that no client thread
    lives in this one before it forks). Returns the problem in one line (None: none) and the
    task-status topic's partition count; raises PreflightInterruptedError when
    ``stop_requested()`` turns true meanwhile (the check is then killed)."""
    read_fd, write_fd = os.pipe()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORK_BLOCKED)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in FORK_BLOCKED:
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(read_fd)
            from tm.commands import preflight as check

            os.write(write_fd, msgspec.json.encode(check(settings)))
            code = 0
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(write_fd)
    deadline = time.monotonic() + PREFLIGHT_TIMEOUT_S
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or stop_requested():
            kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
            if remaining > 0:
                raise PreflightInterruptedError
            return f"pre-flight check did not finish in {PREFLIGHT_TIMEOUT_S:.0f} s", 0
        try:  # a signal interrupts the wait (the handler's wakeup fd is not watched here)
            readable, _, _ = select.select([read_fd], [], [], min(remaining, POLL_S))
        except InterruptedError:
            continue
        if readable:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return "pre-flight check crashed", 0
    found = json.loads(b"".join(chunks))  # tm.commands.Preflight (its module loads clients)
    return found["problem"], found["partitions"]
