"""Chaos with an exact oracle, in both delivery modes: a gateway produces unique tasks (and,
now and then, a malformed one), crawlers reading with ``isolation.level=read_committed`` answer
each crawl request once, and a seeded schedule of faults hits tm meanwhile: kill -9 of a worker
and of the whole process tree, terminated backends, a PostgreSQL crash-restart, a broker kill
-9, a proxy in front of PostgreSQL and of Kafka that delays, blackholes or resets connections,
and a second member that joins under load and leaves.

Then the oracle, after a clean stop: every task exactly once in the table, in the state its
crawler chose with its result; every task got a crawl request; every malformed task is a dead
letter; the committed offsets equal the end offsets; tm exited 0. Outputs: in exactly-once mode
each crawl request and each dead letter is read exactly once; in at-least-once mode the
duplicates are counted and printed, not asserted. A failure prints the seed and the schedule:
``CHAOS_SEED=<seed> pytest tests/chaos`` replays it. ``CHAOS_MINUTES`` makes a longer run and
``CHAOS_DELIVERY`` (comma-separated) chooses the modes (both by default, about 4 minutes
each).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer

from harness import answers, free_port, unique, wait_for
from harness.kafka import KafkaHeaders, describe_group
from harness.procfs import alive, process_tree
from harness.proxy import TcpProxy
from harness.stack import Stack, make_stack
from harness.tm import TmRun
from tests.chaos.cluster import Kafka, Postgres, remove, scratch_dir
from tm import config
from tm.config import Settings
from tm.traffic import new_task_message

pytestmark = pytest.mark.e2e

FAULTS = (
    "kill_worker",
    "kill_tm",
    "terminate_backends",
    "pg_crash",
    "broker_kill",
    "pg_delay",
    "pg_blackhole",
    "pg_reset",
    "kafka_delay",
    "kafka_blackhole",
    "kafka_reset",
    "member_join_leave",
)
GAP_S = (4.0, 8.0)  # quiet time after each fault's end, so that tm gets going again
DURATION_S = (2.0, 5.0)  # how long a fault with a duration lasts
RATE = 150.0  # gateway tasks per second
MALFORMED_EVERY = 50  # one gateway event in this many is malformed: a dead letter
# tm tuned for quick recovery; the faults are short.
TM_ENV = {
    "TM_WORKERS": "2",
    "TM_RETRY_BACKOFF_INITIAL_MS": "200",
    "TM_RETRY_BACKOFF_MAX_MS": "2000",
    "POSTGRES_QUERY_TIMEOUT": "4000",
    "POSTGRES_CONNECTION_TIMEOUT": "3000",
    "KAFKA_SESSION_TIMEOUT": "6000",
    "KAFKA_HEARTBEAT_INTERVAL": "1000",
    "KAFKA_REQUEST_TIMEOUT": "10000",
    "GRACEFUL_SHUTDOWN_TIMEOUT": "30000",
}
# Exactly-once as Kubernetes runs it: a static instance id per tm (its pod's name), so that a tm
# started after a kill -9 takes over its predecessor's transactional ids and aborts what it left
# open at once; a transaction timeout (the bound of a commit that cannot end) within the grace
# period of a stop.
EXACTLY_ONCE_ENV = {"TM_DELIVERY": "exactly-once", "KAFKA_TRANSACTION_TIMEOUT": "20000"}


@dataclass(frozen=True)
class Fault:
    kind: str
    duration_s: float  # 0 for instant faults
    gap_s: float  # quiet time after it

    def __str__(self) -> str:
        return f"{self.kind}({self.duration_s:.1f}s)+{self.gap_s:.1f}s"


def draw_schedule(seed: int, minutes: float | None) -> list[Fault]:
    """Every kind once in a seeded order; with ``minutes``, more drawn at random to fill them."""
    rng = random.Random(seed)
    kinds = list(FAULTS)
    rng.shuffle(kinds)
    if minutes:
        budget = minutes * 60
        while sum(sum(DURATION_S) / 2 + sum(GAP_S) / 2 for _ in kinds) < budget:
            kinds.append(rng.choice(FAULTS))
    return [Fault(kind, rng.uniform(*DURATION_S), rng.uniform(*GAP_S)) for kind in kinds]


# -- the world around tm -----------------------------------------------------------------------


@dataclass
class World:
    settings: Settings
    stack: Stack
    pg: Postgres
    kafka: Kafka
    pg_proxy: TcpProxy
    kafka_proxy: TcpProxy
    tmp_path: Path
    delivery: str
    runs: list[TmRun] = field(default_factory=list)

    @property
    def tm(self) -> TmRun:
        return self.runs[-1]

    def start_tm(self, *, member: str = "tm-0", keep: bool = True) -> TmRun:
        """A tm; ``member``: its static instance id in exactly-once mode. Not ``keep``: an
        extra member, not the tm the faults aim at."""
        env = {
            **TM_ENV,
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": str(self.pg_proxy.port),
            "KAFKA_BROKERS": f"127.0.0.1:{self.kafka_proxy.port}",
        }
        if self.delivery == "exactly-once":
            env |= {**EXACTLY_ONCE_ENV, "KAFKA_GROUP_INSTANCE_ID": member}
        run = TmRun(self.stack, self.tmp_path, **env)
        if keep:
            self.runs.append(run)
        return run


# The delivery modes to run (both unless CHAOS_DELIVERY names one).
DELIVERIES = os.environ.get("CHAOS_DELIVERY", "at-least-once,exactly-once").split(",")


@pytest.fixture(params=DELIVERIES)
def world(
    request: pytest.FixtureRequest, tmp_path: Path, pg_up: None, kafka_up: None
) -> Iterator[World]:
    """A private PostgreSQL and broker (the faults must not reach the shared stack), a proxy in
    front of each for tm, and a fresh database and topics on them."""
    root = scratch_dir("tm-chaos-")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(remove, root)
        (root / "pg").mkdir()
        (root / "kafka").mkdir()
        pg = Postgres(root / "pg")
        pg.start()
        cleanup.callback(pg.stop)
        listener = free_port()
        kafka_proxy = cleanup.enter_context(TcpProxy("127.0.0.1", listener))
        kafka = Kafka(root / "kafka", proxied_listener_port=listener, proxied_port=kafka_proxy.port)
        kafka.start()
        cleanup.callback(kafka.stop)
        pg_proxy = cleanup.enter_context(TcpProxy("127.0.0.1", pg.port))
        env = {
            **os.environ,
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": str(pg.port),
            "POSTGRES_USER": "postgres",
            "POSTGRES_DB": "postgres",  # where make_stack creates the test's database
            "KAFKA_BROKERS": kafka.bootstrap,
        }
        settings = config.load(env)
        stack = cleanup.enter_context(make_stack(settings))  # dropped after the finally below
        stack.env["POSTGRES_USER"] = "postgres"
        world = World(settings, stack, pg, kafka, pg_proxy, kafka_proxy, tmp_path, request.param)
        try:
            yield world
        finally:
            for run in world.runs:
                run.close()
            if not answers("127.0.0.1", kafka.port):
                kafka.start()
            if not answers("127.0.0.1", pg.port):
                pg.start()


# -- gateway and crawlers --------------------------------------------------------------------


def _producer(world: World) -> Producer:
    return Producer(
        {
            "bootstrap.servers": world.kafka.bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": 300_000,  # outlives every broker fault of the schedule
            "log_level": 0,  # the broker's restarts are expected: no connection noise
        }
    )


def crawler_choice(seed: int, task_id: str) -> tuple[str, str]:
    """What the crawler reports for a task: (status, result), drawn from the seed."""
    digest = hashlib.sha256(f"{seed}/{task_id}".encode()).digest()
    if digest[0] < 64:  # a quarter fail
        return "error", f"crawl of {task_id} failed"
    return "completed", f"page of {task_id}"


class Gateway:
    """Produces ``new_task_message(n)`` at RATE from a thread until stopped; event n is
    malformed (its body is not JSON: a dead letter) when n is a multiple of MALFORMED_EVERY."""

    def __init__(self, world: World) -> None:
        self.sent = 0
        self.malformed: set[bytes] = set()  # their bodies, each unique
        self.failures: list[str] = []
        self._world = world
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        producer = _producer(self._world)
        topic = self._world.stack.topic

        def on_delivery(error: Any, _message: Any) -> None:
            if error is not None:
                self.failures.append(str(error))

        began = time.monotonic()
        n = 0
        while not self._stop.is_set():
            ahead = began + n / RATE - time.monotonic()
            if ahead > 0:
                self._stop.wait(ahead)
                continue
            headers, value = new_task_message(n)
            if n % MALFORMED_EVERY == 0:
                value = f"not json {n}".encode()
                self.malformed.add(value)
            try:
                producer.produce(topic, value=value, headers=headers, on_delivery=on_delivery)
            except BufferError:
                producer.poll(0.05)
                continue
            producer.poll(0)
            n += 1
        if producer.flush(300):
            self.failures.append("gateway: messages left unacknowledged")
        self.sent = n

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(320)
        assert not self._thread.is_alive(), "the gateway did not finish"
        return self.sent


class Crawlers:
    """Read the crawl requests and answer each task once with the status drawn for it."""

    def __init__(self, world: World, seed: int) -> None:
        self.answers: dict[str, tuple[str, str]] = {}  # task id -> (status, result)
        self.emails: dict[str, str] = {}  # task id -> user_email of its request
        self.read_at: dict[str, tuple[int, int]] = {}  # task id -> (partition, offset) read
        self.duplicates = 0  # crawl requests for a task already answered: tm's doing
        self.doubled: list[tuple[str, tuple[int, int], tuple[int, int]]] = []  # the first few
        self.rereads = 0  # the same record read again: the crawlers' own group's doing
        self.failures: list[str] = []
        self._world, self._seed = world, seed
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="crawlers", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        world = self._world
        consumer = Consumer(
            {
                "bootstrap.servers": world.kafka.bootstrap,
                "group.id": unique("crawlers"),
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",  # what a crawler must do (README)
                "log_level": 0,
            }
        )
        consumer.subscribe([world.stack.requests_topic])
        producer = _producer(world)

        def on_delivery(error: Any, _message: Any) -> None:
            if error is not None:
                self.failures.append(str(error))

        try:
            while not self._stop.is_set():
                for message in consumer.consume(500, 0.2):
                    if message.error() is not None:
                        continue
                    key = message.key()
                    assert key is not None  # tm keys its crawl requests by task id
                    task_id = key.decode()
                    at = (int(message.partition() or 0), int(message.offset() or 0))
                    with self._lock:
                        if task_id in self.answers:
                            first = self.read_at[task_id]
                            if first == at:
                                self.rereads += 1
                            else:
                                self.duplicates += 1
                                if len(self.doubled) < 10:
                                    self.doubled.append((task_id, first, at))
                            continue
                        self.read_at[task_id] = at
                        status, result = crawler_choice(self._seed, task_id)
                        self.answers[task_id] = (status, result)
                        value = message.value()
                        assert value is not None  # a crawl request has a body
                        self.emails[task_id] = orjson.loads(value)["user_email"]
                    body = {"crawl_result": result} if status == "completed" else {"error": result}
                    headers: KafkaHeaders = [
                        ("task_type", b"web-crawl"),
                        ("status", status.encode()),
                        ("task_id", task_id.encode()),
                        ("timestamp", _iso_now().encode()),
                    ]
                    while True:
                        try:
                            producer.produce(
                                world.stack.topic,
                                value=orjson.dumps(body),
                                headers=headers,
                                on_delivery=on_delivery,
                            )
                            break
                        except BufferError:
                            producer.poll(0.05)
                producer.poll(0)
            if producer.flush(300):
                self.failures.append("crawlers: answers left unacknowledged")
        finally:
            consumer.close()

    def answered(self) -> int:
        with self._lock:
            return len(self.answers)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(320)


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"


# -- faults ----------------------------------------------------------------------------------


def inflict(world: World, fault: Fault, rng: random.Random, log: list[str]) -> None:
    """Do ``fault`` (and undo it after its duration); append what happened to ``log``."""
    tm, kind, hold = world.tm, fault.kind, fault.duration_s
    if kind == "kill_worker":
        living = [pid for pid in tm.worker_pids() if alive(pid)]
        if living:
            victim = rng.choice(living)
            os.kill(victim, signal.SIGKILL)
            log.append(f"kill -9 worker {victim}")
    elif kind == "kill_tm":
        processes = process_tree(tm.process.pid)[1:]
        os.killpg(tm.process.pid, signal.SIGKILL)
        tm.process.wait(10)
        log.append(f"kill -9 of tm's process group {tm.process.pid}")
        # Its children end too (the group's kill, or PDEATHSIG): a new tm starts after them.
        wait_for(lambda: not any(alive(p) for p in processes), what="tm's processes gone")
        world.start_tm()
    elif kind == "terminate_backends":
        rows = world.stack.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'tm' AND pid <> pg_backend_pid()"
        )
        log.append(f"pg_terminate_backend x{sum(1 for r in rows if r[0])}")
    elif kind == "pg_crash":
        world.pg.crash()
        time.sleep(hold)
        world.pg.start()
        log.append(f"PostgreSQL crash-restart, down {hold:.1f} s")
    elif kind == "broker_kill":
        world.kafka.kill()
        time.sleep(hold)
        world.kafka.start()
        log.append(f"broker kill -9 and restart, down {hold:.1f} s")
    elif kind == "member_join_leave":
        joined = world.start_tm(member="tm-1", keep=False)
        try:
            time.sleep(hold + 8)  # its join, a rebalance, some batches of its own
        finally:
            code = joined.stop(timeout_s=60)
        assert code == 0, f"the member that joined exited {code}:\n{joined.output()[-5000:]}"
        log.append(f"a member joined for {hold + 8:.1f} s and left")
    else:
        target, mode = kind.split("_")
        proxy = world.pg_proxy if target == "pg" else world.kafka_proxy
        if mode == "delay":
            proxy.delay(0.2)
        elif mode == "blackhole":
            proxy.blackhole()
        else:
            proxy.cut()
        time.sleep(hold)
        proxy.restore()
        log.append(f"{target} proxy {mode} for {hold:.1f} s")


# -- the test --------------------------------------------------------------------------------


def test_every_task_exactly_once_through_a_seeded_schedule_of_faults(world: World) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    minutes = float(os.environ["CHAOS_MINUTES"]) if os.environ.get("CHAOS_MINUTES") else None
    schedule = draw_schedule(seed, minutes)
    replay = f"seed {seed}: CHAOS_SEED={seed} pytest tests/chaos; schedule: " + ", ".join(
        map(str, schedule)
    )
    print(replay)
    rng = random.Random(seed)
    stack = world.stack
    done: list[str] = []
    world.start_tm().wait_assigned(stack.partitions, timeout_s=60)
    gateway = Gateway(world)
    crawlers = Crawlers(world, seed)
    try:
        try:
            wait_for(lambda: crawlers.answered() > 300, timeout_s=60, what="traffic flowing")
            for fault in schedule:
                inflict(world, fault, rng, done)
                time.sleep(fault.gap_s)
        finally:
            sent = gateway.stop()
        assert gateway.failures == [], replay

        tasks = sent - len(gateway.malformed)

        def settled() -> bool:
            if crawlers.answered() < tasks:
                return False
            finished = stack.count("status <> 'new'")
            return finished >= tasks

        wait_for(settled, timeout_s=180, interval_s=1.0, what=f"all {tasks} tasks finished")
    except BaseException:
        print("faults done:", "; ".join(done))
        print(describe_group(stack.kafka_config, stack.group))
        print("committed:", stack.committed(), "ends:", stack.end_offsets())
        print("tm output (last run):\n" + world.tm.output()[-20000:])
        raise
    finally:
        crawlers.stop()
    tm = world.tm
    code = tm.stop(timeout_s=60)
    output = tm.output()
    letters = Counter(m.value() for m in stack.read_topic(stack.dlq_topic, timeout_s=30))
    doubled_letters = sum(n - 1 for n in letters.values())
    print("faults done:", "; ".join(done))
    print(
        f"{world.delivery}: {tasks} tasks and {len(gateway.malformed)} malformed;"
        f" {crawlers.duplicates} duplicate crawl request(s), {doubled_letters} duplicate dead"
        f" letter(s) read with read_committed; {crawlers.rereads} record(s) the crawlers read"
        " again (their own group's redelivery, not counted)"
    )
    for task_id, first, again in crawlers.doubled:
        print(f"  task {task_id}: read at partition/offset {first}, again at {again}")

    assert code == 0, f"{replay}\n{output[-20000:]}"
    assert crawlers.failures == [], replay
    rows = stack.query("SELECT id::text, user_email, status::text, result FROM web_crawl_tasks")
    assert len(rows) == tasks, f"{replay}: {len(rows)} rows for {tasks} tasks"
    assert len({r["user_email"] for r in rows}) == tasks, f"{replay}: a task was applied twice"
    assert {r["user_email"] for r in rows} == {
        f"user{n}@example.com" for n in range(sent) if n % MALFORMED_EVERY
    }
    assert set(crawlers.answers) == {r["id"] for r in rows}, f"{replay}: a task got no request"
    wrong = [r["id"] for r in rows if (r["status"], r["result"]) != crawlers.answers[r["id"]]]
    assert wrong == [], f"{replay}: {len(wrong)} task(s) not in their crawler's state"
    assert set(letters) == gateway.malformed, f"{replay}: dead letters differ from the malformed"
    assert stack.all_committed(), f"{replay}: offsets not committed to the end"
    if world.delivery == "exactly-once":
        assert crawlers.duplicates == 0, f"{replay}: {crawlers.duplicates} crawl requests twice"
        assert doubled_letters == 0, f"{replay}: {doubled_letters} dead letters twice"
