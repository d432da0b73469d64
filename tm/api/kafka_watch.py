"""Kafka for the API process: one long-lived consumer, read from one thread, every few seconds.

The consumer carries tm's group id but never subscribes, so it never joins the group; it only
asks the cluster for its metadata (the Kafka check of the health probes) and for the group's
committed offsets and the partitions' high watermarks (the lag gauge of ``/metrics``). Probes and
scrapes read the last answers and never wait for the broker; no connection is opened per call.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from confluent_kafka import (
    Consumer,
    ConsumerGroupState,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from tm.adapters.kafka import client_config
from tm.api.check import STALE_AFTER_S, Check
from tm.config import KafkaSettings

log = logging.getLogger("tm.api")

REFRESH_INTERVAL_S = 2.0  # how often metadata and lag are read
REQUEST_TIMEOUT_S = 3.0  # each metadata, committed-offsets or watermark request
JOIN_TIMEOUT_S = 2 * REQUEST_TIMEOUT_S  # close(): the thread may be inside a request


@dataclass(frozen=True, slots=True)
class Lag:
    """Per partition of the task-status topic: high watermark minus the group's committed offset
    (the whole partition when the group has committed nothing: a new group starts earliest)."""

    by_partition: dict[int, int] = field(default_factory=dict)
    # The group's committed offset per partition (the low watermark where it has committed
    # nothing: where a new group starts). A partition whose lag grows while this stands still
    # is stalled, even when the sum over partitions moves.
    committed: dict[int, int] = field(default_factory=dict)
    checked_at: float = 0.0  # time.monotonic(); 0: never

    def is_fresh(self, now: float) -> bool:
        return self.checked_at > 0 and now - self.checked_at <= STALE_AFTER_S


class KafkaWatch:
    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tm-api-kafka", daemon=True)
        self._last_error: str | None = None
        # Written by the thread, read by the event loop: each is replaced whole, never mutated.
        self.check = Check.pending()
        self.lag = Lag()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(JOIN_TIMEOUT_S)

    def _on_error(self, error: KafkaError) -> None:
        self._last_error = f"{error.name()}: {error.str()}"

    def _run(self) -> None:
        config = client_config(self._settings)
        config.update(
            {
                "group.id": self._settings.group_id,
                "client.id": f"{self._settings.client_id}-api",
                "enable.auto.commit": False,
                "log_level": 0,  # broker errors reach us through error_cb, not stderr
                "error_cb": self._on_error,
            }
        )
        try:
            consumer = Consumer(config)
            admin = AdminClient({k: v for k, v in config.items() if k != "group.id"})
        except KafkaException as exc:
            self.check = Check.now(is_up=False, started=time.monotonic(), error=str(exc))
            log.error("cannot create the API's Kafka client", extra={"fields": {"error": exc}})
            return
        try:
            while not self._stop.is_set():
                self._refresh(consumer, admin)
                self._stop.wait(REFRESH_INTERVAL_S)
        finally:
            consumer.close()

    def _refresh(self, consumer: Consumer, admin: AdminClient) -> None:
        started = time.monotonic()
        previous = self.check
        try:
            metadata = consumer.list_topics(timeout=REQUEST_TIMEOUT_S)
        except KafkaException as exc:
            error = _describe(exc)
            if self._last_error:
                error += f" (last broker error: {self._last_error})"
            self.check = Check.now(is_up=False, started=started, error=error)
            if previous.is_up:
                log.warning("kafka check failed", extra={"fields": {"error": error}})
            return
        topic = metadata.topics.get(self._settings.task_status_topic)
        partitions = sorted(topic.partitions) if topic is not None and not topic.error else []
        self.check = Check.now(
            is_up=bool(metadata.brokers),
            started=started,
            error=None if metadata.brokers else "no broker in the metadata",
            details={
                "topicsCount": len(metadata.topics),
                "clusterId": metadata.cluster_id or "unknown",
                "controllerId": metadata.controller_id
                if metadata.controller_id is not None and metadata.controller_id >= 0
                else "unknown",
                "brokers": len(metadata.brokers),
                "isConnected": True,
                "groupId": self._settings.group_id,
                "taskStatusTopic": self._settings.task_status_topic,
                "taskStatusPartitions": len(partitions),
                # Readiness needs every partition owned by some member of the group (this
                # pod's workers may own only their share of it); None: not known.
                "groupAssignedPartitions": self._group_assigned(admin),
            },
        )
        if not previous.is_up and self.check.is_up and previous.error != "not checked yet":
            log.info("kafka check passes again")
        self._last_error = None
        if partitions:
            self._refresh_lag(consumer, partitions)

    def _group_assigned(self, admin: AdminClient) -> int | None:
        """Partitions of the task-status topic assigned to members of the stable group (0
        while it rebalances), or None when the group cannot be described."""
        group = self._settings.group_id
        try:
            description = admin.describe_consumer_groups([group])[group].result(REQUEST_TIMEOUT_S)
        except (KafkaException, TimeoutError):
            return None
        if description.state != ConsumerGroupState.STABLE:
            return 0
        topic = self._settings.task_status_topic
        return sum(
            1
            for member in description.members
            if member.assignment is not None
            for tp in member.assignment.topic_partitions
            if tp.topic == topic
        )

    def _refresh_lag(self, consumer: Consumer, partitions: list[int]) -> None:
        topic = self._settings.task_status_topic
        try:
            committed = consumer.committed(
                [TopicPartition(topic, p) for p in partitions], timeout=REQUEST_TIMEOUT_S
            )
            lags: dict[int, int] = {}
            positions: dict[int, int] = {}
            for tp in committed:
                watermarks = consumer.get_watermark_offsets(
                    TopicPartition(topic, tp.partition), timeout=REQUEST_TIMEOUT_S
                )
                if watermarks is None:
                    return  # timed out: keep the last answer, which will age
                low, high = watermarks
                start = tp.offset if tp.offset >= 0 else low
                lags[tp.partition] = max(0, high - max(start, low))
                positions[tp.partition] = max(start, low)
        except KafkaException:
            return  # the next round tries again; a stale answer is not served
        self.lag = Lag(by_partition=lags, committed=positions, checked_at=time.monotonic())


def _describe(exc: KafkaException) -> str:
    error = exc.args[0] if exc.args else None
    if isinstance(error, KafkaError):
        return f"{error.name()}: {error.str()}"
    return str(exc)
