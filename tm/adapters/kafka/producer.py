"""The worker's producer: crawl requests and dead letters."""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from tm.adapters.kafka.clients import producer_config
from tm.adapters.kafka.errors import is_fatal, text, translate, translated
from tm.config import KafkaSettings
from tm.errors import FatalError, KafkaUnavailableError


class KafkaSink:
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
    ) -> None:
        self.max_message_bytes = max_message_bytes
        config = producer_config(settings, max_message_bytes=self.max_message_bytes)
        config["on_delivery"] = self._on_delivery
        self._flush_timeout_s = settings.request_timeout_ms / 1000 + 5
        self._producer = Producer(config, logger=logger) if logger else Producer(config)
        # Failed delivery reports since the last flush; appended from the flushing thread.
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
        # The delivery callback is the producer's default (set in its config): one fewer
        # argument per call, on the path of every crawl request. No decorator either: this is
        # called once per message.
        produce = self._producer.produce
        while True:
            try:
                produce(topic, value, key, headers=headers, timestamp=timestamp_ms)
                return
            except BufferError:
                # The local queue is full: serve delivery reports to make room.
                self._producer.poll(0.05)
            except KafkaException as exc:
                raise translate(exc) from exc

    @translated
    def flush(self) -> None:
        """Wait for the acknowledgement of everything produced since the last flush; raise
        KafkaUnavailableError if any message was not delivered (FatalError if it never will)."""
        remaining = self._producer.flush(self._flush_timeout_s)
        failures, self._failures = self._failures, []
        if remaining:
            raise KafkaUnavailableError(f"{remaining} message(s) not acknowledged in time")
        if failures:
            summary = f"{len(failures)} message(s) not delivered: {text(failures[0])}"
            if any(is_fatal(f) for f in failures):
                raise FatalError(summary)
            raise KafkaUnavailableError(summary)

    @translated
    def close(self, timeout_s: float) -> int:
        """Flush what is queued; return how many messages were left undelivered."""
        return int(self._producer.flush(timeout_s))
