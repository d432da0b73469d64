"""Exactly-once: the worker's transactional producer.

Every message produced between two flushes belongs to one Kafka transaction, begun by the first
of them; :meth:`TransactionalSink.flush` adds the consumer's offsets of the same batches to it
(``send_offsets_to_transaction``, with the member's group metadata) and commits it. A crawler
reading with ``isolation.level=read_committed`` sees the batch's crawl requests and dead letters
if and only if the batch's offsets are committed: once, whatever fails.

Errors as librdkafka sorts them: retriable (the call is made again until the transaction
timeout; a commit or an abort still not done by then is given up as fatal, not taken for failed,
since a commit that timed out goes on in the background: the worker's successor, whose producer
has the same id, settles the transaction, committed or aborted, outputs and offsets together);
abortable (the transaction is aborted and :class:`TransactionAbortedError` raised: the caller
rewinds and retries the batch, whose database step is idempotent); fatal, and anything neither
retriable nor abortable (FatalError: the worker exits, and the supervisor starts a new one,
whose producer fences this one's id and aborts what it left open).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaException, TopicPartition

from tm.adapters.kafka.clients import transactional_producer_config
from tm.adapters.kafka.errors import fatal, kafka_error, kafka_exception, text
from tm.adapters.kafka.producer import KafkaSink
from tm.connections import KafkaSettings
from tm.errors import FatalError, KafkaUnavailableError

if TYPE_CHECKING:
    from tm.pipeline.ports import TransactionOffsets

log = logging.getLogger("tm.kafka")

RETRY_PAUSE_S = 0.1  # between two attempts of a call that failed with a retriable error
MIN_CALL_S = 0.5  # the least time a transactional call is given, however near its deadline
# A librdkafka call still running this long past its own timeout is stuck: librdkafka ignores
# the timeout of some calls (send_offsets_to_transaction while the group coordinator is out of
# reach: librdkafka#5456). The worker asks :meth:`TransactionalSink.overdue`.
OVERRUN_S = 5.0


class TransactionAbortedError(KafkaUnavailableError):
    """The batch's transaction was aborted: nothing of it is visible; retry the batch."""

    def __init__(self, cause: str, error: str) -> None:
        super().__init__(f"transaction aborted: {error}")
        self.cause = cause  # the Kafka error's name, for the metric


class _Abortable(Exception):
    def __init__(self, name: str, error: str) -> None:
        super().__init__(error)
        self.name = name


class TransactionalSink(KafkaSink):
    """A :class:`~tm.adapters.kafka.KafkaSink` whose flushes commit transactions. Call
    :meth:`start` once, from a thread, before producing."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        max_message_bytes: int,
        transactional_id: str,
        logger: logging.Logger | None = None,
    ) -> None:
        config = transactional_producer_config(
            settings, max_message_bytes=max_message_bytes, transactional_id=transactional_id
        )
        super().__init__(
            settings, max_message_bytes=max_message_bytes, logger=logger, config=config
        )
        self.transactional_id = transactional_id
        self._topic = settings.task_status_topic
        self._call_timeout_s = settings.request_timeout_ms / 1000
        self._transaction_timeout_s = settings.transaction_timeout_ms / 1000
        self._open = False  # a transaction has begun and is neither committed nor aborted
        self._given_up = False  # a call ended in FatalError: nothing more is asked of it
        # The librdkafka call running now, and when it should have returned by (monotonic).
        self._running: tuple[str, float, float] | None = None  # (name, timeout, due)

    def start(self) -> None:
        """Register the transactional id with its coordinator: a producer of a previous
        worker with the same id is fenced, and its open transaction aborted. Blocks, at most
        about the request timeout."""
        deadline = time.monotonic() + self._call_timeout_s
        try:
            self._call(deadline, self._producer.init_transactions)
        except _Abortable as exc:  # no coordinator in time: the worker connects again later
            raise KafkaUnavailableError(f"init_transactions: {exc}") from None

    def produce(
        self,
        topic: str,
        *,
        key: bytes | str | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | str | None]],
        timestamp_ms: int = 0,
    ) -> None:
        if not self._open:
            self._begin()
        super().produce(topic, key=key, value=value, headers=headers, timestamp_ms=timestamp_ms)

    @staticmethod
    def longest_call_s(settings: KafkaSettings) -> float:
        """The longest a call of this sink takes by its own bounds: a flush commits within the
        transaction timeout, and an abort after it takes at most the request timeout."""
        return (settings.transaction_timeout_ms + settings.request_timeout_ms) / 1000

    def flush(self, offsets: TransactionOffsets | None = None) -> None:
        """Commit the transaction: what was produced since the last flush, and ``offsets``
        (the next offsets of the task-status topic's partitions, with the group metadata
        taken when they were). Blocks, at most :meth:`longest_call_s`; raises
        TransactionAbortedError (the transaction was aborted) or FatalError."""
        if not self._open:
            self._begin()  # a batch without outputs still commits its offsets
        deadline = time.monotonic() + self._transaction_timeout_s
        try:
            if offsets is not None and offsets.next_offsets:
                positions = [
                    TopicPartition(self._topic, p, o) for p, o in offsets.next_offsets.items()
                ]
                self._call(
                    deadline,
                    self._producer.send_offsets_to_transaction,
                    positions,
                    offsets.group_metadata,
                )
            self._call(deadline, self._producer.commit_transaction, resumable=True)
        except _Abortable as exc:
            self._abort()
            raise TransactionAbortedError(exc.name, str(exc)) from None
        self._open = False
        self._failures = []  # what failed, failed the commit: nothing left to report

    def abort(self) -> bool:
        """Abort the transaction in flight, if any (True): none of its messages or offsets will
        be seen by a read_committed reader. Blocks, at most the request timeout."""
        if not self._open:
            return False
        self._abort()
        return True

    def _abort(self) -> None:
        deadline = time.monotonic() + self._call_timeout_s
        # Let the transaction's produce requests finish first (their AddPartitionsToTxn
        # included): an abort while the first produce is in flight can fail fatally
        # (librdkafka#4849). Failed or not, they are aborted below. Half the time for them,
        # half for the abort.
        try:
            self._timed(self._producer.flush, self._call_timeout_s / 2)
        except (KafkaException, SystemError) as exc:  # a fatal state (fenced): no abort now
            cause = kafka_exception(exc)
            error = kafka_error(cause) if cause is not None else None
            if error is None:
                raise FatalError(f"abort_transaction: {exc}") from None
            raise fatal(error, "abort_transaction") from None
        try:
            self._call(deadline, self._producer.abort_transaction, resumable=True)
        except _Abortable as exc:  # an abort that must be aborted: give the producer up
            raise FatalError(f"abort_transaction: {exc}") from None
        self._open = False
        self._failures = []
        log.info("transaction aborted", extra={"fields": {"id": self.transactional_id}})

    def close(self, timeout_s: float) -> int:
        """Abort a transaction left open (nothing was committed of it), then flush. A producer
        given up (fenced, or a call that never ended) is closed as it is."""
        if self._given_up:
            return 0
        try:
            self.abort()
            return super().close(timeout_s)
        except FatalError as exc:
            log.warning("transactional producer closed", extra={"fields": {"error": str(exc)}})
            return 0

    def _begin(self) -> None:
        try:
            self._producer.begin_transaction()
        except KafkaException as exc:
            error = kafka_error(exc)
            if error is None:
                raise FatalError(f"begin_transaction: {exc}") from None
            raise fatal(error, "begin_transaction") from None
        self._open = True

    @staticmethod
    def _remaining(deadline: float) -> float:
        """What is left until ``deadline`` (a call is given at least MIN_CALL_S)."""
        return max(deadline - time.monotonic(), MIN_CALL_S)

    def _call(
        self, deadline: float, call: Callable[..., Any], *args: Any, resumable: bool = False
    ) -> None:
        """``call(*args, timeout)``, made again while it fails with a retriable error, each
        attempt's timeout what is left until ``deadline``; at the deadline, as abortable, or as
        fatal when the call is ``resumable`` (a commit or an abort, which may still be going
        on). An abortable error raises _Abortable, any other FatalError."""
        try:
            self._retried(deadline, call, *args, resumable=resumable)
        except FatalError:
            self._given_up = True
            raise

    def _retried(
        self, deadline: float, call: Callable[..., Any], *args: Any, resumable: bool
    ) -> None:
        retries = 0
        while True:
            try:
                self._timed(call, *args, min(self._call_timeout_s, self._remaining(deadline)))
                return
            except KafkaException as exc:
                error = kafka_error(exc)
                if error is None:
                    raise FatalError(f"{call.__name__}: {exc}") from None
                if error.fatal():
                    raise fatal(error, call.__name__) from None
                if error.txn_requires_abort():
                    raise _Abortable(error.name(), text(error)) from None
                if not error.retriable():
                    raise FatalError(f"{call.__name__}: {text(error)}") from None
                if time.monotonic() >= deadline:
                    if resumable:  # it may still be going on: the successor settles it
                        raise FatalError(f"{call.__name__}: {text(error)}") from None
                    raise _Abortable(error.name(), text(error)) from None  # not sent: abort
                if retries == 0:  # once per call: an outage must not flood the log
                    log.info(
                        "transactional call failed; retrying",
                        extra={"fields": {"call": call.__name__, "error": text(error)}},
                    )
                retries += 1
                time.sleep(RETRY_PAUSE_S)

    def _timed(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, its last argument its timeout, known to :meth:`overdue` while it
        runs."""
        timeout_s = args[-1]
        self._running = (call.__name__, timeout_s, time.monotonic() + timeout_s + OVERRUN_S)
        try:
            return call(*args)
        finally:
            self._running = None

    def overdue(self, now: float) -> str | None:
        """The librdkafka call now running, if it has run :data:`OVERRUN_S` past its own
        timeout (``now``: time.monotonic()); called from another thread."""
        running = self._running
        if running is None or now < running[2]:
            return None
        name, timeout_s, _ = running
        return f"{name}, {OVERRUN_S:.0f} s past its {timeout_s:.1f} s timeout"
