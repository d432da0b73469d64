"""The worker's producer: crawl requests and dead letters."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, Message, Producer

from tm.adapters.kafka.clients import producer_config
from tm.adapters.kafka.errors import is_fatal, text, translated
from tm.connections import KafkaSettings
from tm.errors import FatalError, KafkaUnavailableError

if TYPE_CHECKING:
    from tm.pipeline.ports import TransactionOffsets

BUFFER_WAIT_S = 0.05  # the local queue is full: serve acknowledgements this long, then retry


class BufferedProducer:
    """A producer that waits for room when its local queue is full and keeps the failed
    delivery reports until they are taken: the one produce/flush loop of the worker's sink and
    of the commands' publisher. Its delivery callback is the producer's default (set in its
    config): one fewer argument per message."""

    def __init__(self, config: dict[str, Any], *, logger: logging.Logger | None = None) -> None:
        config = {**config, "on_delivery": self._on_delivery}
        self._producer = Producer(config, logger=logger) if logger else Producer(config)
        # Failed delivery reports since they were last taken; appended by the thread that polls.
        self._failures: list[KafkaError] = []

    def _on_delivery(self, error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            self._failures.append(error)

    def produce(
        self,
        topic: str,
        *,
        key: bytes | str | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | str | None]],
        timestamp_ms: int = 0,
    ) -> None:
        produce = self._producer.produce
        with translated:
            while True:
                try:
                    produce(topic, value, key, headers=headers, timestamp=timestamp_ms)
                    return
                except BufferError:
                    self._producer.poll(BUFFER_WAIT_S)  # serve delivery reports to make room

    @translated
    def _flush(self, timeout_s: float) -> tuple[int, list[KafkaError]]:
        """Wait up to ``timeout_s`` for the acknowledgements; how many are still missing, and the
        failed delivery reports since the last call."""
        remaining = int(self._producer.flush(timeout_s))
        failures, self._failures = self._failures, []
        return remaining, failures


class KafkaSink(BufferedProducer):
    """``produce`` only enqueues; ``flush`` blocks until every enqueued message is
    acknowledged (call it from a thread).

    ``max_message_bytes`` is the largest record it sends (tm.adapters.kafka.produce_limit, read
    at a worker's boot), which a dead letter is cut to fit."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        max_message_bytes: int,
        logger: logging.Logger | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        """``config``: the producer's, when not :func:`producer_config`'s (a transactional
        sink's)."""
        self.max_message_bytes = max_message_bytes
        self._flush_timeout_s = self.longest_call_s(settings)
        super().__init__(
            config or producer_config(settings, max_message_bytes=max_message_bytes),
            logger=logger,
        )

    @staticmethod
    def longest_call_s(settings: KafkaSettings) -> float:
        """The longest a call of this sink takes by its own bounds (a flush)."""
        return settings.request_timeout_ms / 1000 + 5

    def flush(self, offsets: TransactionOffsets | None = None) -> None:
        """Wait for the acknowledgement of everything produced since the last flush; raise
        KafkaUnavailableError if any message was not delivered (FatalError if it never will).
        ``offsets``: the consumer's, which this sink does not commit (the consumer does)."""
        remaining, failures = self._flush(self._flush_timeout_s)
        if remaining:
            raise KafkaUnavailableError(f"{remaining} message(s) not acknowledged in time")
        if failures:
            summary = f"{len(failures)} message(s) not delivered: {text(failures[0])}"
            if any(is_fatal(f) for f in failures):
                raise FatalError(summary)
            raise KafkaUnavailableError(summary)

    def abort(self) -> bool:
        """What was produced since the last flush will not be committed: nothing to undo here
        (a message produced is on its way)."""
        return False

    def close(self, timeout_s: float) -> int:
        """Flush what is queued; return how many messages were left undelivered."""
        return self._flush(timeout_s)[0]
