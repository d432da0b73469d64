"""The last stage of the consume loop: what becomes of the offsets of acknowledged batches. A
replaceable step (:class:`Commit`): :class:`PollCommit` (at-least-once) sends them with the next
poll, from the poll thread, asynchronously, and synchronously on a revoke;
:class:`TransactionCommit` (exactly-once) hands them to the sink, which commits them in the
transaction that holds the batches' outputs, and the consumer commits nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from tm.core.offsets import Offsets
from tm.errors import PartitionsGoneError, TmError
from tm.observability import metrics
from tm.pipeline import BatchRecord, TransactionOffsets

log = logging.getLogger("tm.worker")

COMMITS_TIMED = 64  # commits awaiting their answer, kept for the commit-stage metric


class Committer(Protocol):
    """The consumer (tm.adapters.kafka.KafkaSource): its synchronous commit, and its group
    metadata (which a transaction's offsets carry)."""

    def commit(self, committable: dict[int, int]) -> None: ...
    def group_metadata(self) -> object: ...


class Commit(Protocol):
    def with_outputs(self, seqs: set[int], source: Committer) -> TransactionOffsets | None:
        """The offsets to commit together with the outputs of the batches ``seqs`` (in their
        transaction), or None when offsets are committed on their own."""
        ...

    def done(self, records: Sequence[BatchRecord]) -> bool:
        """The batches reached their end (acknowledged), in poll order; True when they are the
        first to go through after a failure."""
        ...

    def due(self) -> dict[int, int] | None:
        """Offsets for the next poll to commit (the poll thread sends them), or None."""
        ...

    def on_commit(self, offsets: dict[int, int], error: str | None, rebalancing: bool) -> None:
        """The broker's answer to a commit the poll sent (in the poll thread)."""
        ...

    def before_revoke(self, source: Committer) -> None:
        """Partitions go (in the poll thread, the batches in flight settled or given up): the
        last chance to commit them."""
        ...


class PollCommit:
    """Offsets committed asynchronously with the next poll, in poll order (tm.core.offsets);
    synchronously before a revoke. A commit a rebalance refused is sent again with the next."""

    def __init__(self, state: Offsets, lock: threading.Lock) -> None:
        self._state = state
        self._lock = lock  # the consume loop's: the state is shared with the poll thread
        self._sent: dict[tuple[tuple[int, int], ...], float] = {}  # for the commit metric

    def with_outputs(self, seqs: set[int], source: Committer) -> TransactionOffsets | None:
        return None

    def done(self, records: Sequence[BatchRecord]) -> bool:
        with self._lock:
            for record in records:
                self._state.acked(record.seq)
            return self._state.went_through()

    def due(self) -> dict[int, int] | None:
        with self._lock:
            due = self._state.take_commit()
        if not due:
            return None
        sent = self._sent
        if len(sent) >= COMMITS_TIMED:  # answers that never came (a rebalance): drop the oldest
            del sent[next(iter(sent))]
        sent[_key(due)] = time.perf_counter()
        return due

    def on_commit(self, offsets: dict[int, int], error: str | None, rebalancing: bool) -> None:
        sent_at = self._sent.pop(_key(offsets), None)
        if error is None:
            if sent_at is not None:
                metrics.stage_duration.labels("commit").observe(time.perf_counter() - sent_at)
            return
        with self._lock:
            self._state.commit_refused(offsets)  # sent again with the next commit
        if rebalancing:
            log.info("commit deferred by a rebalance", extra={"fields": {"error": error}})
        else:
            log.warning("commit failed; retried with the next", extra={"fields": {"error": error}})

    def before_revoke(self, source: Committer) -> None:
        with self._lock:
            committable = self._state.take_all()
        if committable:
            try:
                source.commit(committable)  # inside the callback: still our partitions
            except TmError as exc:
                log.warning("commit on revoke failed", extra={"fields": {"error": str(exc)}})


class TransactionCommit:
    """Exactly-once: a batch's offsets go in the transaction of its outputs
    (:meth:`with_outputs`), committed by the sink when it is acknowledged; nothing is committed
    through the consumer, not even on a revoke (the revoke waits for the transactions in flight
    instead, and the broker refuses the offsets of a member that has left the generation)."""

    def __init__(self, state: Offsets, lock: threading.Lock) -> None:
        self._state = state
        self._lock = lock

    def with_outputs(self, seqs: set[int], source: Committer) -> TransactionOffsets:
        """Raises PartitionsGoneError when a partition of one of the batches went while it was
        in flight: committing the batch's outputs without that partition's offsets would have
        its new owner publish them again."""
        # The group metadata with the offsets, not when the transaction commits: if the member
        # leaves this generation meanwhile, the broker refuses these offsets, and the
        # transaction aborts, instead of committing offsets of partitions another member owns.
        with self._lock:
            if self._state.orphaned(seqs):
                raise PartitionsGoneError(
                    "a partition of a batch in flight was revoked or lost: its transaction is"
                    " not committed, and the batch is consumed again"
                )
            return TransactionOffsets(self._state.next_offsets(seqs), source.group_metadata())

    def done(self, records: Sequence[BatchRecord]) -> bool:
        with self._lock:
            for record in records:
                self._state.acked(record.seq)
            self._state.take_all()  # committed with the transaction
            return self._state.went_through()

    def due(self) -> dict[int, int] | None:
        return None

    def on_commit(self, offsets: dict[int, int], error: str | None, rebalancing: bool) -> None:
        """Never called: the consumer sends no commit."""

    def before_revoke(self, source: Committer) -> None:
        """Nothing to send: what reached its end was committed in its transaction."""


def _key(offsets: dict[int, int]) -> tuple[tuple[int, int], ...]:
    return tuple(sorted(offsets.items()))
