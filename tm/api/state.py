"""The supervisor's view of the workers, as the API process last heard it.

The supervisor writes one JSON line every 0.5 s (``Supervisor._publish_state``). A view older
than :data:`STATE_STALE_AFTER_S` means the supervisor is stuck or gone: not ready.
"""

from __future__ import annotations

import time

import msgspec

STATE_STALE_AFTER_S = 5.0  # ten missed state lines


class WorkerState(msgspec.Struct, frozen=True):
    slot: int
    pid: int
    booted: bool
    joined: bool
    partitions: int
    restarts: int
    retrying: bool = False


class SupervisorState(msgspec.Struct, frozen=True):
    started_at: float = 0.0
    stopping: bool = False
    workers: tuple[WorkerState, ...] = ()
    startup_s: float | None = None  # from the start of `tm run` until every worker joined
    restarts_total: dict[str, int] = {}  # children restarted, by role (worker, api)

    @property
    def all_joined(self) -> bool:
        """Every worker is alive and has joined the consumer group."""
        return bool(self.workers) and all(w.pid and w.joined for w in self.workers)


STATE_DECODER = msgspec.json.Decoder(SupervisorState)


class StateReader:
    """Reads state lines from the supervisor's pipe; keeps the last complete one."""

    def __init__(self) -> None:
        self.current = SupervisorState()
        self.received_at = 0.0  # time.monotonic() of the last state line; 0: none yet
        self._buffer = b""

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in reversed(lines):
            if line:
                try:
                    self.current = STATE_DECODER.decode(line)
                except msgspec.DecodeError:
                    continue
                self.received_at = time.monotonic()
                return

    def is_fresh(self, now: float) -> bool:
        return self.received_at > 0 and now - self.received_at <= STATE_STALE_AFTER_S
