"""The supervisor's children: the workers and the API process, kept in their slots
(:mod:`tm.slots`) and forked, signalled and reaped through :class:`tm.processes.Processes`.

:class:`Children` does what is done to a child whatever the supervisor's mode: spawn it, hear
its lines, reap it, schedule its restart with backoff, kill one that stopped sending
heartbeats. It decides nothing about stopping or halting: :meth:`Children.restart` answers
with the reason to halt when a slot keeps failing before it boots, and the supervisor acts.
"""

from __future__ import annotations

import functools
import logging
import os
import signal

from tm.config import Settings
from tm.observability import metricfiles
from tm.processes import Processes
from tm.protocol import EXIT_FENCED
from tm.slots import ApiSlot, Slot, WorkerSlot

log = logging.getLogger("tm.supervisor")

# A silent child's stacks are printed in its signal handler: time given before the SIGKILL.
STACK_DUMP_WAIT_S = 1.0
MAX_BOOT_FAILURES = 3  # consecutive failures before boot, per slot, before halting


class Children:
    """One slot per worker and one for the API process."""

    def __init__(self, settings: Settings, processes: Processes) -> None:
        self._processes = processes
        self.api = ApiSlot()
        self.configure(settings)
        self.restarts_total = {WorkerSlot.role: 0, ApiSlot.role: 0}

    def configure(self, settings: Settings) -> None:
        """Take the settings the children run with: one slot per worker."""
        self._settings = settings
        self.workers = [WorkerSlot(n) for n in range(settings.consumer.workers)]
        self.slots: list[Slot] = [*self.workers, self.api]

    def report_fds(self) -> list[int]:
        """The pipes the children report on, to wait for with ``select``."""
        return [s.fd for s in self.slots if s.fd >= 0]

    def spawn(self, slot: Slot, now: float, *, keep_closed: list[int]) -> None:
        """Fork ``slot``'s child; ``keep_closed``: the parent's own descriptors it must not
        inherit (besides every slot's pipes)."""
        inherited = [fd for s in self.slots for fd in s.fds()] + keep_closed
        child = self._processes.spawn(
            functools.partial(slot.main, self._settings),
            state_pipe=slot.needs_state_pipe,
            inherited=inherited,
        )
        slot.attach(child, now)
        fields = {**slot.spawned_fields(), "pid": child.pid}
        log.info(f"{slot.role} spawned", extra={"fields": fields})

    def read(self, slot: Slot, now: float) -> None:
        """Hear what ``slot``'s child has written (lines of :mod:`tm.protocol`)."""
        try:
            chunk = os.read(slot.fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            return
        for line in slot.reader.feed(chunk):
            slot.hear(line, now)

    def reap(self, now: float) -> list[tuple[Slot, int]]:
        """Collect every child that exited: its slot (now without a child) and exit status.
        Orphans that reparented to this process (as PID 1) are reaped and forgotten."""
        exited: list[tuple[Slot, int]] = []
        while (done := self._processes.reap()) is not None:
            pid, code = done
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            self.read(slot, now)  # its last lines: the F line says why it exited
            slot.detach()
            slot.exit_codes.append(code)
            directory = self._settings.metrics.directory
            if directory is not None:
                metricfiles.forget(pid, directory)
            exited.append((slot, code))
        return exited

    def restart(self, slot: Slot, code: int, now: float) -> str | None:
        """Schedule the restart of ``slot``, whose child exited with ``code``; or, when it
        failed before it booted too many times in a row, or was fenced, return why the service
        must halt."""
        if code == EXIT_FENCED:
            return f"{slot.who} was fenced: {slot.last_error or 'by another process'}"
        if not slot.booted:
            slot.boot_failures += 1
            if slot.boot_failures >= MAX_BOOT_FAILURES:
                return (
                    f"{slot.who} failed {slot.boot_failures} times before it booted: "
                    f"{slot.last_error or f'exit status {code}'}"
                )
        delay = slot.schedule_restart(now)
        self.restarts_total[slot.role] += 1
        log.error(
            f"{slot.role} died; restarting",
            extra={
                "fields": {
                    "slot": slot.number,
                    "code": code,
                    "error": slot.last_error or "-",
                    "restart_in_s": delay,
                }
            },
        )
        slot.last_error = ""
        return None

    def due(self, now: float) -> list[Slot]:
        """The slots without a child whose restart is due."""
        return [
            s for s in self.slots if s.pid == 0 and s.restart_at is not None and now >= s.restart_at
        ]

    def check_heartbeats(self, now: float) -> None:
        """A child that has written nothing for the heartbeat timeout is asked for its threads'
        stacks (SIGUSR1: the faulthandler ``tm run`` registers prints them on stderr), then
        SIGKILLed :data:`STACK_DUMP_WAIT_S` later; the reaper restarts it."""
        timeout_s = self._settings.consumer.heartbeat_timeout_ms / 1000
        for slot in self.slots:
            if not slot.pid:
                continue
            if slot.silent_since is not None:
                if now - slot.silent_since >= STACK_DUMP_WAIT_S:
                    self._processes.kill(slot.pid, signal.SIGKILL)
                    slot.silent_since = None
                    slot.last_heartbeat = now  # killed once
            elif now - slot.last_heartbeat > timeout_s:
                log.error(
                    "worker stopped sending heartbeats; killing it",
                    extra={"fields": {"slot": slot.number, "pid": slot.pid}},
                )
                slot.last_error = f"no heartbeat for {timeout_s:.0f} s"
                self._processes.kill(slot.pid, signal.SIGUSR1)
                slot.silent_since = now

    def signal_workers(self, signum: int) -> None:
        for worker in self.workers:
            if worker.pid:
                self._processes.kill(worker.pid, signum)

    def kill_all(self, signum: int) -> None:
        for slot in self.slots:
            if slot.pid:
                self._processes.kill(slot.pid, signum)

    def wait_all(self) -> None:
        for slot in self.slots:
            if slot.pid:
                self._processes.wait(slot.pid)
                slot.detach()
