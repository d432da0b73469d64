"""The supervisor's slots: one per child it keeps alive, a worker or the API process.

A slot outlives its children: it holds what the supervisor knows of the one running now (pid,
pipes, what its lines said) and what carries over a restart (boot failures, restart backoff,
exit statuses). :class:`WorkerSlot` and :class:`ApiSlot` differ in what their child runs, the
pipes it needs and how the supervisor's log names it; the supervisor's policies treat both
alike.

A child's main is imported in the child only: the supervisor itself loads no Kafka or
PostgreSQL client, whose threads must not cross a fork.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from tm.config import Settings
from tm.processes import Spawned
from tm.protocol import Code, Line, LineReader

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # the delays of a slot's restarts in a row
STABLE_AFTER_S = 60.0  # a child up this long resets its slot's restart backoff


@dataclass(eq=False)
class Slot(ABC):
    number: int
    pid: int = 0  # 0: no child running
    fd: int = -1  # the supervisor's end of the child's report pipe
    reader: LineReader = field(default_factory=LineReader)
    started_at: float = 0.0
    last_heartbeat: float = 0.0  # when the child's last line came
    silent_since: float | None = None  # asked for its stacks, for being silent; killed next
    booted: bool = False
    joined: bool = False  # has had a first assignment (possibly empty) since it started
    retrying: bool = False  # backing off after a transient failure (database or Kafka down)
    owned_partitions: int = 0
    boot_failures: int = 0  # consecutive exits before booting
    restarts: int = 0  # restarts since the slot was last stable: the backoff's position
    restart_at: float | None = None  # when a dead slot's next child is due
    last_error: str = ""  # the child's last F line, or why the supervisor killed it
    exit_codes: list[int] = field(default_factory=list)

    role: ClassVar[str]  # in log lines and the restart counts: "worker" or "api"
    needs_state_pipe: ClassVar[bool] = False  # the supervisor writes its state lines to it

    @property
    @abstractmethod
    def who(self) -> str:
        """The child in the halt message: ``worker 2``, ``the API process``."""

    @abstractmethod
    def spawned_fields(self) -> dict[str, object]:
        """The fields of the "<role> spawned" log line, besides the pid."""

    @abstractmethod
    def main(self, settings: Settings, report_fd: int, state_fd: int) -> int:
        """In the forked child: run it and return its exit status."""

    def hear(self, line: Line, now: float) -> None:
        """Take one line from the child (tm.protocol); any line is a sign of life."""
        self.last_heartbeat = now
        if line.code is Code.BOOTED:
            self.booted = True
            self.boot_failures = 0
        elif line.code is Code.OWNED:
            self.joined = True
            self.owned_partitions = int(line.text or 0)
        elif line.code is Code.RETRYING:
            self.retrying = line.text == "1"
        elif line.code is Code.FAILED:
            self.last_error = line.text

    def schedule_restart(self, now: float) -> float:
        """The child died: set when the next one is due, and return the delay. The backoff
        grows with each restart in a row, and starts over after a child that was stable."""
        if now - self.started_at >= STABLE_AFTER_S:
            self.restarts = 0
        delay = RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]
        self.restarts += 1
        self.restart_at = now + delay
        return delay

    def attach(self, child: Spawned, now: float) -> None:
        """A child was spawned in this slot: start over what is known of the running child."""
        self.pid, self.fd, self.reader = child.pid, child.report_fd, LineReader()
        self.started_at = self.last_heartbeat = now
        self.booted, self.joined, self.retrying = False, False, False
        self.owned_partitions, self.restart_at, self.silent_since = 0, None, None

    def detach(self) -> None:
        """The child is gone (reaped): close the supervisor's ends of its pipes."""
        for fd in self.fds():
            os.close(fd)
        self.pid, self.fd = 0, -1

    def fds(self) -> list[int]:
        """The supervisor's open fds for this slot's child (every other child closes them)."""
        return [self.fd] if self.fd >= 0 else []


@dataclass(eq=False)
class WorkerSlot(Slot):
    role: ClassVar[str] = "worker"

    @property
    def who(self) -> str:
        return f"worker {self.number}"

    def spawned_fields(self) -> dict[str, object]:
        return {"slot": self.number}

    def state(self) -> dict[str, object]:
        """This worker in the supervisor's state line (what the API's readiness reads)."""
        return {
            "slot": self.number,
            "pid": self.pid,
            "booted": self.booted,
            "joined": self.joined,
            "partitions": self.owned_partitions,
            "restarts": self.restarts,
            "retrying": self.retrying,
        }

    def main(self, settings: Settings, report_fd: int, state_fd: int) -> int:
        from tm import worker

        return worker.main(settings, slot=self.number, report_fd=report_fd)


@dataclass(eq=False)
class ApiSlot(Slot):
    number: int = -1
    state_fd: int = -1  # the supervisor's end of the state pipe

    role: ClassVar[str] = "api"
    needs_state_pipe: ClassVar[bool] = True

    @property
    def who(self) -> str:
        return "the API process"

    def spawned_fields(self) -> dict[str, object]:
        return {}

    def main(self, settings: Settings, report_fd: int, state_fd: int) -> int:
        from tm.api.server import main as api_main

        return api_main(settings, state_fd=state_fd, report_fd=report_fd)

    def attach(self, child: Spawned, now: float) -> None:
        super().attach(child, now)
        self.state_fd = child.state_fd

    def detach(self) -> None:
        super().detach()
        self.state_fd = -1

    def fds(self) -> list[int]:
        return super().fds() + ([self.state_fd] if self.state_fd >= 0 else [])
