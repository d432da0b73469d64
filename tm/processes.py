"""The operating-system calls of the supervisor: fork a child, signal it, reap it, read the clock.

:class:`Processes` is the seam: :class:`~tm.supervisor.Supervisor` makes these calls only
through it, so that its policies (restarts, the halt, heartbeats, the drain) are tested with a
fake and a fake clock (``tests/unit/test_supervisor.py``), and :class:`OsProcesses` is the real
thing.

A child is forked with SIGTERM, SIGINT and SIGCHLD blocked (:data:`FORK_BLOCKED`): a signal in
the window is delivered after the fork, to whoever it was sent to, instead of being lost or
killing a child that has no handler yet. The child keeps SIGTERM blocked until its event loop
handles it (tm.worker, tm.api.server), and asks Linux for a SIGTERM when the supervisor dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass
from typing import Protocol

PR_SET_PDEATHSIG = 1  # prctl option, from <linux/prctl.h>
# Blocked around fork(): a signal in the window is delivered after it, not lost or fatal.
FORK_BLOCKED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGCHLD})

# What a child runs: (fd of its report pipe, fd of its state pipe or -1) -> its exit status.
ChildMain = Callable[[int, int], int]


@dataclass(frozen=True, slots=True)
class Spawned:
    """A child just forked, and the supervisor's ends of its pipes (non-blocking)."""

    pid: int
    report_fd: int  # read: the child's lines (tm.protocol)
    state_fd: int = -1  # write: the supervisor's state lines; -1 when no state pipe was asked for


class Processes(Protocol):
    """Process operations of the supervisor. None of them blocks, except :meth:`wait`."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (``time.monotonic``)."""
        ...

    def spawn(self, main: ChildMain, *, state_pipe: bool, inherited: Sequence[int]) -> Spawned:
        """Fork a child that closes the fds ``inherited`` from the supervisor, runs ``main`` and
        exits with its status. Pipes: one for the child's report lines, and with ``state_pipe``
        one for the supervisor's state lines. May raise OSError (out of processes or fds)."""
        ...

    def kill(self, pid: int, signum: int) -> None:
        """Send ``signum`` to ``pid``; a process that is gone already is not an error."""
        ...

    def reap(self) -> tuple[int, int] | None:
        """One child that exited, as (pid, exit code; -N for killed by signal N), or None when
        none has (or there are no children). Reaps any child, not only the ones spawned here:
        as PID 1 the supervisor inherits orphans."""
        ...

    def wait(self, pid: int) -> None:
        """Block until ``pid`` has exited and reap it (after a SIGKILL); gone already is fine."""
        ...


class OsProcesses:
    """:class:`Processes` on the real operating system."""

    def __init__(self) -> None:
        self._parent_pid = os.getpid()  # what a child's parent must be (1 when we are PID 1)

    def monotonic(self) -> float:
        return time.monotonic()

    def spawn(self, main: ChildMain, *, state_pipe: bool, inherited: Sequence[int]) -> Spawned:
        read_fd, write_fd = os.pipe()
        state_r, state_w = os.pipe() if state_pipe else (-1, -1)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORK_BLOCKED)
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                os.close(read_fd)
                if state_w >= 0:
                    os.close(state_w)
                _become_child(mask, self._parent_pid)
                for fd in inherited:
                    os.close(fd)
                code = main(write_fd, state_r)
            finally:
                from tm.observability import logs

                logs.shutdown()  # os._exit skips atexit: export the child's queued log records
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        if state_pipe:
            os.close(state_r)
            os.set_blocking(state_w, False)
        return Spawned(pid, read_fd, state_w)

    def kill(self, pid: int, signum: int) -> None:
        kill(pid, signum)

    def reap(self) -> tuple[int, int] | None:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return None
        if pid == 0:
            return None
        return pid, os.waitstatus_to_exitcode(status)

    def wait(self, pid: int) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def kill(pid: int, signum: int) -> None:
    """``os.kill``, except that a process already gone is not an error."""
    try:
        os.kill(pid, signum)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def _become_child(mask: Set[int], parent_pid: int) -> None:
    """In a child just forked: the signal dispositions and mask of a worker or API process."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards SIGTERM
    # A SIGTERM before the child's own handler exists must wait, not kill it: the child
    # unblocks it once its event loop handles it (tm.worker, tm.api.server).
    signal.pthread_sigmask(
        signal.SIG_SETMASK, (mask | {signal.SIGTERM}) - {signal.SIGINT, signal.SIGCHLD}
    )
    _stop_with_parent(parent_pid)


def _stop_with_parent(parent_pid: int) -> None:
    """In a child: ask Linux for a SIGTERM when the supervisor dies (even by SIGKILL), so that
    no worker or API process outlives it holding partitions or APP_PORT."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the heartbeat pipe closing is the fallback
        return
    if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)  # pending (blocked) until the child handles it
