"""Kafka for the API process: one long-lived :class:`~tm.adapters.kafka.tools.GroupReader`,
driven from one thread, every few seconds.

Its consumer carries tm's group id but never subscribes, so it never joins the group; it only
asks the cluster for its metadata (the Kafka check of the health probes), for the group's members
and their partitions, and for the group's committed offsets and the partitions' high watermarks
(the lag gauge of ``/metrics``, the status page). Probes, scrapes and pages read the last answers
and never wait for the broker; no connection is opened per call.

A partition is *stalled* when its committed offset has not moved for :data:`STALL_AFTER_S` while
its lag stood above where it was at the last commit: a paused or stuck partition hides in the sum
over partitions while the others make progress.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from tm.adapters.kafka.tools import Group, GroupReader, PartitionOffsets
from tm.api.check import STALE_AFTER_S, Check
from tm.connections import KafkaSettings
from tm.errors import TmError

log = logging.getLogger("tm.api")

REFRESH_INTERVAL_S = 2.0  # how often metadata and lag are read
REQUEST_TIMEOUT_S = 3.0  # each metadata, committed-offsets or watermark request
JOIN_TIMEOUT_S = 2 * REQUEST_TIMEOUT_S  # close(): the thread may be inside a request
# A batch commits well within a second; a committed offset that stands still this long while
# messages wait behind it is a partition left behind (the alert rule waits 15 min to page).
STALL_AFTER_S = 30.0


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a partition's committed offset last moved, and since when its lag has grown past
    the lag it had then (None: it has not)."""

    committed: int
    lag_at_move: int
    growing_since: float | None = None  # time.monotonic()

    def is_stalled(self, now: float) -> bool:
        return self.growing_since is not None and now - self.growing_since >= STALL_AFTER_S


def advance(previous: Progress | None, *, committed: int, lag: int, now: float) -> Progress:
    """A partition's progress after one more look at its committed offset and lag."""
    if previous is None or previous.committed != committed:
        return Progress(committed=committed, lag_at_move=lag)
    if lag <= previous.lag_at_move:
        return Progress(committed=committed, lag_at_move=previous.lag_at_move)
    return Progress(
        committed=committed,
        lag_at_move=previous.lag_at_move,
        growing_since=previous.growing_since if previous.growing_since is not None else now,
    )


@dataclass(frozen=True, slots=True)
class Lag:
    """Per partition of the task-status topic: high watermark minus the group's committed offset
    (the whole partition when the group has committed nothing: a new group starts earliest)."""

    by_partition: dict[int, int] = field(default_factory=dict)
    # The group's committed offset per partition (the low watermark where it has committed
    # nothing: where a new group starts). A partition whose lag grows while this stands still
    # is stalled, even when the sum over partitions moves.
    committed: dict[int, int] = field(default_factory=dict)
    ends: dict[int, int] = field(default_factory=dict)  # high watermark per partition
    stalled: frozenset[int] = frozenset()  # partitions stalled (see the module's docstring)
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
        self.group: Group | None = None  # the last description of the group; None: none yet
        self._progress: dict[int, Progress] = {}  # the thread's own

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(JOIN_TIMEOUT_S)

    def _on_error(self, error: str) -> None:
        self._last_error = error

    def _run(self) -> None:
        try:
            reader = GroupReader(self._settings, on_error=self._on_error)
        except TmError as exc:
            self.check = Check.now(is_up=False, started=time.monotonic(), error=str(exc))
            log.error("cannot create the API's Kafka client", extra={"fields": {"error": exc}})
            return
        try:
            while not self._stop.is_set():
                self._refresh(reader)
                self._stop.wait(REFRESH_INTERVAL_S)
        finally:
            reader.close()

    def _refresh(self, reader: GroupReader) -> None:
        started = time.monotonic()
        previous = self.check
        topic = self._settings.task_status_topic
        try:
            cluster = reader.cluster(topic, timeout_s=REQUEST_TIMEOUT_S)
        except TmError as exc:
            error = str(exc)
            if self._last_error:
                error += f" (last broker error: {self._last_error})"
            self.check = Check.now(is_up=False, started=started, error=error)
            if previous.is_up:
                log.warning("kafka check failed", extra={"fields": {"error": error}})
            return
        self.check = Check.now(
            is_up=bool(cluster.brokers),
            started=started,
            error=None if cluster.brokers else "no broker in the metadata",
            details={
                "topicsCount": cluster.topics,
                "clusterId": _or_unknown(cluster.cluster_id),
                "controllerId": _or_unknown(cluster.controller_id),
                "brokers": cluster.brokers,
                "isConnected": True,
                "groupId": self._settings.group_id,
                "taskStatusTopic": topic,
                "taskStatusPartitions": len(cluster.partitions),
                # Readiness needs every partition owned by some member of the group (this
                # pod's workers may own only their share of it); None: not known.
                "groupAssignedPartitions": self._group_assigned(reader),
            },
        )
        if not previous.is_up and self.check.is_up and previous.error != "not checked yet":
            log.info("kafka check passes again")
        self._last_error = None
        if cluster.partitions:
            self._refresh_lag(reader, cluster.partitions)

    def _group_assigned(self, reader: GroupReader) -> int | None:
        """Partitions of the task-status topic assigned to members of the stable group (0
        while it rebalances), or None when the group cannot be described."""
        try:
            self.group = reader.group(self._settings.task_status_topic, timeout_s=REQUEST_TIMEOUT_S)
        except TmError:
            self.group = None
            return None
        return self.group.assigned

    def _refresh_lag(self, reader: GroupReader, partitions: list[int]) -> None:
        topic = self._settings.task_status_topic
        try:
            offsets = reader.offsets(topic, partitions, timeout_s=REQUEST_TIMEOUT_S)
        except TmError:
            return  # the next round tries again; a stale answer is not served
        now = time.monotonic()
        positions = {p: _position(o) for p, o in offsets.items()}
        lags = {p: max(0, offsets[p].high - position) for p, position in positions.items()}
        self._progress = {
            p: advance(self._progress.get(p), committed=position, lag=lags[p], now=now)
            for p, position in positions.items()
        }
        self.lag = Lag(
            by_partition=lags,
            committed=positions,
            ends={p: o.high for p, o in offsets.items()},
            stalled=frozenset(p for p, got in self._progress.items() if got.is_stalled(now)),
            checked_at=now,
        )


def _or_unknown(value: str | int | None) -> str | int:
    return "unknown" if value is None else value


def _position(offsets: PartitionOffsets) -> int:
    """Where the group stands: its committed offset, or where a new group starts (the low
    watermark, also when retention has deleted past the committed offset)."""
    committed = offsets.low if offsets.committed is None else offsets.committed
    return max(committed, offsets.low)
