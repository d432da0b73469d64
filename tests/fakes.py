"""In-memory fakes of tm's own Protocols (tm.pipeline.Sink, Database) and of the
consumed-message shape, for unit tests of the pipeline. No client library is mocked."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tm.core.decode import RawMessage
from tm.core.messages import NewTask, Outcome, StatusUpdate, TaskStatus, update_outcome
from tm.errors import KafkaUnavailableError, RowRejectedError, TransientError
from tm.pipeline import BatchRecord, Pipeline, TransactionOffsets


@dataclass
class FakeMessage:
    """What the pipeline reads from a consumed confluent-kafka message."""

    _headers: list[tuple[str, bytes]] | None
    _value: bytes | None
    _partition: int = 0
    _offset: int = 0
    _key: bytes | None = None
    _topic: str = "task-status"
    _timestamp_ms: int = 1_700_000_000_000

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def topic(self) -> str:
        return self._topic

    def timestamp(self) -> tuple[int, int]:
        return (1, self._timestamp_ms)

    def error(self) -> None:
        return None


@dataclass
class FakeDatabase:
    """The state machine of tm/sql/0003 and 0005 over a dict (the rule of
    ``tm.core.messages.update_outcome``); rows whose e-mail or result contains ``refuse`` make
    the whole call fail like SQLSTATE 22021 does."""

    tasks: dict[Any, tuple[TaskStatus, str | None, datetime | None]] = field(default_factory=dict)
    calls: list[tuple[int, int]] = field(default_factory=list)
    fail_with: TransientError | None = None

    async def apply(
        self, creates: list[NewTask], updates: list[StatusUpdate]
    ) -> tuple[list[str], list[str]]:
        self.calls.append((len(creates), len(updates)))
        if self.fail_with is not None:
            raise self.fail_with
        if any("refuse" in t.user_email for t in creates) or any(
            "refuse" in u.result for u in updates
        ):
            raise RowRejectedError("invalid byte sequence", sqlstate="22021")
        staged = dict(self.tasks)
        created = []
        for task in creates:
            if task.id in staged:
                finished = staged[task.id][0] is not TaskStatus.NEW
                created.append("unchanged" if finished else "duplicate")
            else:
                staged[task.id] = (TaskStatus.NEW, None, None)
                created.append("created")
        updated = []
        for update in updates:
            outcome = update_outcome(
                staged.get(update.id), update.status, update.result, update.finished_at
            )
            if outcome is Outcome.UPDATED:
                staged[update.id] = (update.status, update.result, update.finished_at)
            updated.append(outcome.value)
        self.tasks = staged
        return created, updated


@dataclass
class FakeSink:
    """The producer; with ``transactional``, its flushes are transactions: ``committed`` holds
    each one's messages and offsets, ``aborted`` the messages of each aborted one."""

    produced: list[dict[str, Any]] = field(default_factory=list)
    acknowledged: list[dict[str, Any]] = field(default_factory=list)
    fail_flush: bool = False
    transactional: bool = False
    committed: list[tuple[list[dict[str, Any]], dict[int, int]]] = field(default_factory=list)
    aborted: list[list[dict[str, Any]]] = field(default_factory=list)
    # Set: the first flush waits for it (``flushing`` is set once it waits), a slow broker.
    hold_first_flush: threading.Event | None = None
    flushing: threading.Event = field(default_factory=threading.Event)

    def produce(
        self,
        topic: str,
        *,
        key: bytes | str | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | str | None]],
        timestamp_ms: int = 0,
    ) -> None:
        self.produced.append({"topic": topic, "key": key, "value": value, "headers": dict(headers)})

    def flush(self, offsets: TransactionOffsets | None = None) -> None:
        if self.hold_first_flush is not None and not self.flushing.is_set():
            self.flushing.set()
            self.hold_first_flush.wait(10)
        if self.fail_flush:
            if self.transactional:
                self.abort()
            else:
                self.produced = []
            raise KafkaUnavailableError("1 message(s) not delivered: _MSG_TIMED_OUT")
        pending, self.produced = self.produced, []
        self.acknowledged.extend(pending)
        if self.transactional:
            self.committed.append((pending, offsets.next_offsets if offsets else {}))

    def abort(self) -> bool:
        if not self.transactional or not self.produced:
            return False
        self.aborted.append(self.produced)
        self.produced = []
        return True


async def run_stages(pipeline: Pipeline, messages: Sequence[RawMessage]) -> BatchRecord:
    """One poll through the pipeline's stages in the worker's order, without the overlap:
    decode, apply, publish, acknowledge; the batch's record."""
    applied = await pipeline.apply(pipeline.decode(messages), 0)
    (record,) = await pipeline.acknowledge([applied.publish()])
    return record
