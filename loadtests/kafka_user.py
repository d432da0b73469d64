"""The Kafka side of the load test: gateway users that send `new` tasks, and one crawler per
locust process that reads ``requests-web-crawl`` and answers each crawl request once.

How it lives with gevent: one :class:`Traffic` per locust process holds one producer and one
consumer, and a single greenlet drives them with zero timeouts only (``Consumer.consume(n, 0)``,
``Producer.poll(0)``; ``produce`` never blocks, it raises ``BufferError`` when its queue is
full), then yields with ``gevent.sleep``. librdkafka does its network I/O on its own native
threads, which gevent does not touch, so no call into confluent-kafka ever holds the hub. The
alternatives were worse here: a thread per user multiplies clients and connections and needs
each user's crawler to see its own tasks' requests; ``--processes`` splits the crawler, and a
crawl request can land in a process that did not send its task. The only blocking calls are at
the start of a test run (metadata and end offsets, a few milliseconds) and at its end (close).

Each task is followed through two stages, reported to locust as request events of type
``stage`` (so locust's statistics, charts and CSV show them):

1. gateway ``produce`` of the `new` event -> its crawl request read by the crawler;
2. the crawler's ``produce`` of the `completed`/`error` update -> the row's new status seen
   through ``GET /api/tasks/{id}``: first looked at ``LOAD_POLL_MS`` after the produce, then
   each time 1.5 times later, at most every 250 ms (so the figure is overstated by up to the
   last wait plus one request: the load on the API stays a few requests per task).

A stage not done within ``LOAD_STAGE_TIMEOUT_S`` is a failure; so is any task still in flight
``LOAD_DRAIN_S`` after the users stop. Tasks are matched to their crawl requests by the
``base_url`` of :func:`tm.traffic.new_task_message` (``.../page/<n>``, ``n`` unique per run),
so crawl requests of anyone else's tasks on the same topic are ignored.
"""

from __future__ import annotations

import heapq
import logging
import random
import time
import uuid
from collections import deque
from functools import partial
from typing import Any

import gevent
import orjson
from confluent_kafka import Consumer, Producer, TopicPartition
from gevent.pool import Pool
from geventhttpclient import HTTPClient
from locust import User, constant_throughput, task
from locust.env import Environment

from loadtests.options import (
    REPEATED_REQUEST,
    STAGE_REQUEST,
    STAGE_TYPE,
    STAGE_VISIBLE,
    LoadOptions,
)
from tm.adapters import kafka
from tm.config import Settings
from tm.traffic import new_task_message, update_message

log = logging.getLogger("loadtests")

OPTIONS = LoadOptions.from_env()
IDLE_SLEEP_S = 0.002  # the loop's pause when nothing came in: the stage-1 resolution
CONSUME_BATCH = 500  # crawl requests taken per look
SWEEP_EVERY_S = 0.5  # how often stages are checked against their timeout
CHECKERS = 32  # concurrent GET /api/tasks/{id} of stage 2
LOOK_BACKOFF = 1.5  # each look at a row that is not there yet waits this much longer...
LOOK_MAX_S = 0.25  # ...up to this
RECENT_IDS = 2000  # task ids kept for the API users' /api/tasks/{id}
METADATA_TIMEOUT_S = 10.0
CLOSE_FLUSH_S = 10.0
PRODUCER = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,  # a gateway sends each event at once; 5 ms as `tm send` does
    "compression.type": "lz4",
    "delivery.report.only.error": True,
    "log_level": 3,
}

TRAFFIC: Traffic | None = None  # the running test's, created on test_start


class Traffic:
    """The gateway's producer, the crawler and the stage bookkeeping of one locust process."""

    def __init__(self, environment: Environment, settings: Settings, token: str | None) -> None:
        self.env = environment
        self.options = OPTIONS
        config = kafka.client_config(settings.kafka)
        self.topic = settings.kafka.task_status_topic
        self.requests_topic = settings.kafka.web_crawl_request_topic
        self.producer = Producer({**config, **PRODUCER})
        self.consumer = Consumer(
            {
                **config,
                "group.id": f"tm-load-crawler-{uuid.uuid4().hex[:8]}",  # never joined: assign()
                "enable.auto.commit": False,
                "log_level": 3,
            }
        )
        self._assign_at_end()
        host = environment.host or ""
        self.http = HTTPClient.from_url(
            host, concurrency=CHECKERS, connection_timeout=5, network_timeout=10
        )
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.random = random.Random()
        self.first_n = time.time_ns() // 1000  # n of this run's first task: unique per run
        self.sent = 0
        self.started = time.monotonic()
        self.waiting_request: dict[int, float] = {}  # n -> perf_counter at produce
        self.answered: set[int] = set()
        self.waiting_visible: dict[str, tuple[float, str]] = {}  # id -> (produced, status)
        self.due: list[tuple[float, int, str]] = []  # (when to look, looks so far, task id)
        self.looks = 0
        self.recent_ids: deque[str] = deque(maxlen=RECENT_IDS)
        self.repeated = 0
        self.checkers = Pool(CHECKERS)
        self._stopping = False
        self._loop = gevent.spawn(self._run)

    def _assign_at_end(self) -> None:
        meta = self.consumer.list_topics(self.requests_topic, timeout=METADATA_TIMEOUT_S)
        topic = meta.topics.get(self.requests_topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise RuntimeError(f"topic {self.requests_topic!r} not found: run `tm topics create`")
        tps = []
        for p in topic.partitions:
            _, high = self.consumer.get_watermark_offsets(
                TopicPartition(self.requests_topic, p), timeout=METADATA_TIMEOUT_S
            )
            tps.append(TopicPartition(self.requests_topic, p, high))
        self.consumer.assign(tps)

    # -- events ----------------------------------------------------------------------------

    def _fire(
        self, name: str, started: float, *, length: int = 0, error: str | None = None
    ) -> None:
        # locust's EventHook (locust/event.py) is not annotated: fire() is an untyped call.
        self.env.events.request.fire(  # type: ignore[no-untyped-call]
            request_type=STAGE_TYPE,
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=RuntimeError(error) if error else None,
            context={},
        )

    # -- the gateway -----------------------------------------------------------------------

    def send_new(self) -> None:
        """One gateway `new` event (nothing once the run's count or time budget is spent)."""
        o = self.options
        if self._stopping or self.sent >= o.max_tasks:
            return
        if time.monotonic() - self.started > o.max_seconds:
            return
        n = self.first_n + self.sent
        self.sent += 1
        headers, value = new_task_message(n)
        started = time.perf_counter()
        try:
            self.producer.produce(
                self.topic, value=value, headers=headers, on_delivery=partial(self._lost, n)
            )
        except BufferError:
            self._fire(STAGE_REQUEST, started, error="producer queue full")
            return
        self.waiting_request[n] = started

    def _lost(self, n: int, error: Any, _message: Any) -> None:
        started = self.waiting_request.pop(n, None)
        if error is not None and started is not None:
            self._fire(STAGE_REQUEST, started, error=f"gateway produce failed: {error}")

    # -- the crawler -----------------------------------------------------------------------

    def _answer(self, message: Any) -> None:
        value = message.value() or b""
        try:
            n = int(orjson.loads(value)["base_url"].rsplit("/", 1)[1])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return  # not a task of this load test
        started = self.waiting_request.pop(n, None)
        if started is None:
            if n in self.answered:
                self.repeated += 1
                self._fire(REPEATED_REQUEST, time.perf_counter(), length=len(value))
            return
        self._fire(STAGE_REQUEST, started, length=len(value))
        self.answered.add(n)
        key = message.key() or b""
        task_id = key.decode()
        failed = self.random.random() < self.options.error_share
        headers, body = update_message(uuid.UUID(task_id), failed=failed)
        produced = time.perf_counter()
        try:
            self.producer.produce(self.topic, key=key, value=body, headers=headers)
        except BufferError:
            self._fire(STAGE_VISIBLE, produced, error="producer queue full")
            return
        self.waiting_visible[task_id] = (produced, "error" if failed else "completed")
        heapq.heappush(self.due, (produced + self.options.poll_s, 1, task_id))

    # -- stage 2: the row's state through the API --------------------------------------------

    def _look(self, task_id: str, looks: int) -> None:
        waiting = self.waiting_visible.get(task_id)
        if waiting is None:
            return  # timed out meanwhile
        produced, status = waiting
        try:
            reply = self.http.get(f"/api/tasks/{task_id}", headers=self.auth)
            code, body = reply.status_code, reply.read()
        except Exception as exc:  # a refused connection, a timeout: look again until the limit
            code, body = 0, str(exc).encode()
        self.looks += 1
        if task_id not in self.waiting_visible:
            return  # failed by the sweep while the request was out
        if code == 200 and orjson.loads(body).get("status") == status:
            del self.waiting_visible[task_id]
            self.recent_ids.append(task_id)
            self._fire(STAGE_VISIBLE, produced, length=len(body))
        elif code in (401, 403):
            del self.waiting_visible[task_id]
            self._fire(STAGE_VISIBLE, produced, error=f"HTTP {code}: is API_TOKEN tm's token?")
        else:  # look again, less and less often: the API serves the operators too
            wait_s = min(self.options.poll_s * LOOK_BACKOFF**looks, LOOK_MAX_S)
            heapq.heappush(self.due, (time.perf_counter() + wait_s, looks + 1, task_id))

    def _sweep(self, now: float, *, everything: bool = False) -> None:
        """Fail the stages that ran past their timeout (all of them when ``everything``). Both
        dicts are in insertion order, which is the order their clocks started."""
        limit = now - self.options.stage_timeout_s
        why = self._late(everything)
        old_requests = []
        for n, started in self.waiting_request.items():
            if not everything and started >= limit:
                break
            old_requests.append((n, started))
        for n, started in old_requests:
            del self.waiting_request[n]
            self._fire(STAGE_REQUEST, started, error=why)
        old_updates = []
        for task_id, (produced, _) in self.waiting_visible.items():
            if not everything and produced >= limit:
                break
            old_updates.append((task_id, produced))
        for task_id, produced in old_updates:
            del self.waiting_visible[task_id]
            self._fire(STAGE_VISIBLE, produced, error=why)

    def _late(self, everything: bool) -> str:
        if everything:
            return f"still in flight {self.options.drain_s:.0f} s after the users stopped"
        return f"not done within {self.options.stage_timeout_s:.0f} s"

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        next_sweep = time.perf_counter() + SWEEP_EVERY_S
        while not self._stopping or self.in_flight():
            got = self.consumer.consume(CONSUME_BATCH, 0)
            for message in got:
                if message.error() is None:
                    self._answer(message)
            self.producer.poll(0)
            now = time.perf_counter()
            while self.due and self.due[0][0] <= now and self.checkers.free_count() > 0:
                _, looks, task_id = heapq.heappop(self.due)
                self.checkers.spawn(self._look, task_id, looks)
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + SWEEP_EVERY_S
            gevent.sleep(0 if got else IDLE_SLEEP_S)

    def in_flight(self) -> int:
        return len(self.waiting_request) + len(self.waiting_visible)

    def some_task_id(self) -> str | None:
        return self.random.choice(self.recent_ids) if self.recent_ids else None

    def close(self) -> None:
        """Stop sending, let the tasks in flight finish for up to LOAD_DRAIN_S, fail the rest,
        and close the clients."""
        self._stopping = True
        deadline = time.monotonic() + self.options.drain_s
        while self.in_flight() and time.monotonic() < deadline and not self._loop.dead:
            gevent.sleep(0.05)
        self._loop.kill()
        self.checkers.kill()
        self._sweep(time.perf_counter(), everything=True)
        self.producer.flush(CLOSE_FLUSH_S)
        self.consumer.close()
        self.http.close()
        log.info(
            "load traffic: %d tasks sent, %d answered, %d crawl requests repeated,"
            " %d looks at /api/tasks/{id} (%.1f a task)",
            self.sent,
            len(self.answered),
            self.repeated,
            self.looks,
            self.looks / max(len(self.answered), 1),
        )


class GatewayUser(User):
    """Sends gateway `new` events at LOAD_USER_RATE a second (tm.traffic.new_task_message)."""

    wait_time = constant_throughput(OPTIONS.user_rate)

    @task
    def new_task(self) -> None:
        if TRAFFIC is not None:
            TRAFFIC.send_new()
