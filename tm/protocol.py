"""What a child (a worker, the API process) tells the supervisor, and how it ends.

Each child writes lines to its own pipe; the supervisor reads every pipe in its loop. Any line
counts as a sign of life. The lines:

``B``
    booted: connected, about to consume or serve (a slot's boot failures start again from 0).
``H``
    heartbeat, every second from the child's event loop (a stuck loop stops them, and the
    supervisor kills the child after ``TM_HEARTBEAT_TIMEOUT_MS``, its stacks printed first; a
    worker's hung client call ends the worker itself, tm.worker.threads).
``A <n>``
    a worker owns n partitions now (sent after every assignment, revoke or loss).
``R 1`` / ``R 0``
    a worker is retrying after a transient failure (database or Kafka down) / went through
    again; readiness reports the degraded state meanwhile.
``F <text>``
    the one-line reason before a fatal exit (the supervisor's halt message and its "died;
    restarting" log line quote it).

A child never blocks on its pipe: a line is dropped when the pipe is full (the supervisor
only needs the latest state, and the next heartbeat comes a second later).

The exit statuses (:data:`EXIT_OK`, :data:`EXIT_CRASH`, :data:`EXIT_FATAL`,
:data:`EXIT_FENCED`) tell the operator, in the supervisor's log, how a child ended. The
supervisor restarts any child that exits on its own with the same backoff, but one that was
fenced; what halts the service is a slot failing before it boots, again and again, or a worker
fenced by another process with its static group instance id (tm.supervisor).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from enum import StrEnum

EXIT_OK = 0  # stopped when asked, after draining
EXIT_CRASH = 1  # an unexpected exception, or a TmError that is not fatal
EXIT_FATAL = 3  # a FatalError: a broken invariant or a bad deploy (its reason is on the F line)
EXIT_FENCED = 4  # another process took the worker's identity: tm stops rather than fence it back


class Code(StrEnum):
    BOOTED = "B"
    HEARTBEAT = "H"
    OWNED = "A"
    RETRYING = "R"
    FAILED = "F"


@dataclass(frozen=True, slots=True)
class Line:
    """One parsed line: its code and what follows the code (may be empty)."""

    code: Code | None  # None: a line this version does not know (still a sign of life)
    text: str = ""


class Reporter:
    """A child's side of its pipe; ``fd`` None (a child run on its own) reports nothing."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        if fd is not None:
            os.set_blocking(fd, False)

    def booted(self) -> None:
        self._send(Code.BOOTED)

    def heartbeat(self) -> None:
        self._send(Code.HEARTBEAT)

    def owned(self, partitions: int) -> None:
        self._send(Code.OWNED, str(partitions))

    def retrying(self, retrying: bool) -> None:
        self._send(Code.RETRYING, "1" if retrying else "0")

    def failed(self, reason: str) -> None:
        self._send(Code.FAILED, reason)

    def _send(self, code: Code, text: str = "") -> None:
        if self._fd is None:
            return
        line = f"{code.value} {text}" if text else code.value
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._fd, (line.replace("\n", " ") + "\n").encode())


class LineReader:
    """The supervisor's side of one pipe: bytes in, whole lines out."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Line]:
        self._buffer += chunk
        *raw_lines, self._buffer = self._buffer.split(b"\n")
        return [parse(raw.decode(errors="replace")) for raw in raw_lines]


def parse(line: str) -> Line:
    head, _, text = line.partition(" ")
    try:
        return Line(Code(head), text)
    except ValueError:
        return Line(None, line)
