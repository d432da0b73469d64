"""What the pipeline drives, as Protocols: the producer, the database and the task-event feed.
The adapters implement them; the unit tests use fakes of them (tests/fakes.py). The tracing
of a batch is in :mod:`tm.pipeline.record`, beside the record it reads."""

from __future__ import annotations

from typing import NamedTuple, Protocol

from tm.core.messages import NewTask, StatusUpdate, TaskEvent


class TransactionOffsets(NamedTuple):
    """Exactly-once: what a batch's transaction commits besides its outputs: the consumer's next
    offsets per partition, and the member's group metadata taken with them (the broker refuses
    them once the member has left that generation)."""

    next_offsets: dict[int, int]
    group_metadata: object


class Sink(Protocol):
    """The producer. ``produce`` only enqueues and never blocks for long; ``flush`` blocks
    until every message produced since the last flush is acknowledged and raises
    KafkaUnavailableError when any was not (run it in a thread). A transactional sink
    (exactly-once) commits there its transaction, with ``offsets``, the consumer's offsets of
    the same batches; ``abort`` (blocks too) drops what was produced since the last flush where
    it can (a transaction: it returns True) and does nothing where it cannot."""

    def produce(
        self,
        topic: str,
        *,
        key: bytes | str | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | str | None]],
        timestamp_ms: int = 0,
    ) -> None: ...

    def flush(self, offsets: TransactionOffsets | None = None) -> None: ...

    def abort(self) -> bool: ...


class TaskEventSink(Protocol):
    """The task-event feed (tm.adapters.redis.TaskEvents). ``publish`` only queues: it never
    blocks and never raises (what cannot be sent is dropped and counted)."""

    def publish(self, events: list[TaskEvent]) -> None: ...


class Database(Protocol):
    """One transaction per call: new tasks first, then status updates; one outcome per row, in
    order. Raises RowRejectedError when one row's data is refused (nothing is written),
    DatabaseUnavailableError when the call may succeed later, FatalError otherwise."""

    async def apply(
        self, creates: list[NewTask], updates: list[StatusUpdate]
    ) -> tuple[list[str], list[str]]: ...
