"""What the stages hand each other, and what one batch did.

:class:`Decoded` is a poll decoded into a batch (what the database step takes). A
:class:`BatchRecord` is made by the database step and filled by the stages after it, in order,
and only by them: outcomes, dead letters and the times of each stage. Tracing (a
:class:`Trace` per batch, or the no-op one), the batch's metrics and the commit step read it.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from types import MappingProxyType
from typing import Protocol

from tm.core.batch import Batch
from tm.core.decode import RawMessage
from tm.core.messages import Reason


class Decoded:
    """A poll's messages decoded into a batch, with what decoding them cost."""

    __slots__ = ("batch", "decode_s", "invalid_trace_contexts", "messages")

    def __init__(
        self,
        batch: Batch,
        messages: Sequence[RawMessage],
        *,
        decode_s: float,
        invalid_trace_contexts: int,
    ) -> None:
        self.batch = batch
        self.messages = messages
        self.decode_s = decode_s
        self.invalid_trace_contexts = invalid_trace_contexts  # dropped trace headers


class BatchRecord:
    """What one batch did: its outcomes (for its trace and the task events), its counts (for the
    metrics and the per-batch debug line) and its stage times (``time.perf_counter()``)."""

    __slots__ = (
        "applied_at",
        "committable",
        "created",
        "db_s",
        "db_started",
        "dead_lettered",
        "dead_letters",
        "decode_s",
        "invalid_trace_contexts",
        "outcomes",
        "publish_s",
        "publishing_at",
        "seq",
        "size",
        "timestamps_ms",
        "trace",
        "transaction_s",
        "updated",
    )

    def __init__(self, decoded: Decoded, seq: int, trace: Trace) -> None:
        batch = decoded.batch
        self.seq = seq  # the worker's sequence number of the batch (tm.core.offsets)
        self.size = batch.size
        self.committable = batch.committable
        self.timestamps_ms = batch.timestamps_ms
        self.decode_s = decoded.decode_s
        self.invalid_trace_contexts = decoded.invalid_trace_contexts
        self.trace = trace
        # One outcome per create and per update, in batch order (None: the row was refused).
        self.created: list[str | None] = []
        self.updated: list[str | None] = []
        self.outcomes: Counter[str] = Counter()
        self.dead_letters: Counter[str] = Counter()
        self.dead_lettered: list[tuple[int, Reason]] = []  # (message ref, reason)
        # Stage durations in seconds. publish_s runs from the end of the database call to the
        # acknowledgement of everything the batch produced (the wait for the batch before it
        # included). transaction_s (exactly-once): the commit of the batch's transaction, its
        # offsets sent and its outputs acknowledged; None in at-least-once mode.
        self.transaction_s: float | None = None
        self.db_s = self.publish_s = 0.0
        self.db_started = self.applied_at = self.publishing_at = 0.0


class Trace(Protocol):
    """The trace of one batch (tm.observability.tracing.BatchTrace): it reads the record."""

    @property
    def traceparents(self) -> Mapping[int, str]:
        """Message ref -> the traceparent its crawl request carries, for the traced messages
        only; every other message's crawl request carries its upstream traceparent unchanged."""
        ...

    def active(self) -> AbstractContextManager[object]: ...
    def end(self, record: BatchRecord) -> None: ...
    def fail(self, error: BaseException, record: BatchRecord) -> None: ...


class Tracer(Protocol):
    """Starts a Trace per batch (tm.observability.tracing.Tracing)."""

    def start_batch(self, batch: Batch, messages: Sequence[RawMessage]) -> Trace: ...
    def close(self) -> None: ...


class _NoTrace:
    """Tracing off: a trace that records nothing."""

    traceparents: Mapping[int, str] = MappingProxyType({})  # (a class attribute)

    def active(self) -> AbstractContextManager[object]:
        return self._context

    def end(self, record: BatchRecord) -> None:
        pass

    def fail(self, error: BaseException, record: BatchRecord) -> None:
        pass

    _context = contextlib.nullcontext()


class _NoTracer:
    def start_batch(self, batch: Batch, messages: Sequence[RawMessage]) -> Trace:
        return NO_TRACE

    def close(self) -> None:
        pass


NO_TRACE: Trace = _NoTrace()
NO_TRACER: Tracer = _NoTracer()
