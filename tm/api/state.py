"""The supervisor's view of the workers, as the API process last heard it."""

from __future__ import annotations

import msgspec


class WorkerState(msgspec.Struct, frozen=True):
    slot: int
    pid: int
    booted: bool
    joined: bool
    partitions: int
    restarts: int


class SupervisorState(msgspec.Struct, frozen=True):
    started_at: float = 0.0
    stopping: bool = False
    workers: tuple[WorkerState, ...] = ()

    @property
    def all_joined(self) -> bool:
        """Every worker is alive and has joined the consumer group."""
        return bool(self.workers) and all(w.pid and w.joined for w in self.workers)


STATE_DECODER = msgspec.json.Decoder(SupervisorState)


class StateReader:
    """Reads state lines from the supervisor's pipe; keeps the last complete one."""

    def __init__(self) -> None:
        self.current = SupervisorState()
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
                return
