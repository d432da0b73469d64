"""The Redis task-event feed (REDIS_URL, DESIGN §11), end to end against a real redis-server of
the test's own (so that it can be killed): every transition a batch applies arrives once, in
order per task, on the stream and on the task's channel; Redis down costs events, never
consumption; ``tm watch`` prints what happens; a bad REDIS_URL stops startup with one line.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from harness import unique, wait_for
from harness.outcomes import FAST
from harness.servers import RedisServer
from harness.stack import Stack
from harness.tm import TmRun

pytestmark = pytest.mark.e2e

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def feed_env(server: RedisServer) -> dict[str, str]:
    return {"REDIS_URL": server.url, "TM_REDIS_STREAM": unique("tm:events")}


def new_message(
    task_id: uuid.UUID, n: int, *, traced: bool = False
) -> tuple[None, list[tuple[str, bytes]], bytes]:
    headers = [
        ("task_type", b"web-crawl"),
        ("status", b"new"),
        ("timestamp", b"2026-01-02T03:04:05.678Z"),
        ("task_id", str(task_id).encode()),
    ]
    if traced:
        headers.append(("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01".encode()))
    body = {"user_email": f"u{n}@example.com", "user_query": "q", "base_url": "https://e.com"}
    return None, headers, orjson.dumps(body)


def update_message(
    task_id: uuid.UUID, status: str, text: str
) -> tuple[None, list[tuple[str, bytes]], bytes]:
    headers = [
        ("task_type", b"web-crawl"),
        ("status", status.encode()),
        ("timestamp", b"2026-01-02T04:05:06.789Z"),
        ("task_id", str(task_id).encode()),
    ]
    body = {"crawl_result": text} if status == "completed" else {"error": text}
    return None, headers, orjson.dumps(body)


def entries(server: RedisServer, name: str) -> list[tuple[str, dict[str, str]]]:
    """XRANGE of the whole stream: (entry id, fields), all str, as the client decodes responses
    (redis-py's types cannot follow decode_responses=True and say bytes | str, or None)."""
    return cast("list[tuple[str, dict[str, str]]]", server.client().xrange(name))


def stream(server: RedisServer, name: str) -> list[dict[str, str]]:
    return [fields for _id, fields in entries(server, name)]


def by_task(events: list[dict[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for event in events:
        out.setdefault(event["task_id"], []).append(event["status"])
    return out


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            body: bytes = reply.read()  # urlopen()'s reply is Any in typeshed
            return body.decode()
    except OSError:
        return ""


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_every_transition_arrives_once_in_order_per_task(
    stack: Stack, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = feed_env(redis_server)
    name = env["TM_REDIS_STREAM"]
    ids = [uuid.uuid4() for _ in range(30)]
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", **env)
    watcher: subprocess.Popen[str] | None = None
    try:
        tm.wait_assigned(stack.partitions)
        stack.produce([new_message(t, n, traced=n == 0) for n, t in enumerate(ids)])
        stack.produce([new_message(ids[0], 0)])  # a redelivered `new`: duplicate, no event
        wait_for(lambda: len(stream(redis_server, name)) >= 30, what="30 created events")
        # Follow one task's channel the way a gateway would, before it changes.
        watcher = subprocess.Popen(
            [sys.executable, "-m", "tm", "watch", str(ids[10]), "--count", "2"],
            env={**os.environ, **stack.env, **env},
            stdout=subprocess.PIPE,
            text=True,
        )
        channel = f"tm:task:{ids[10]}"  # a pub/sub message is not kept: wait for the listener
        wait_for(
            lambda: dict(redis_server.client().pubsub_numsub(channel)).get(channel, 0) > 0,
            what="tm watch subscribed",
        )
        updates = [update_message(t, "completed", f"page {t}") for t in ids[:10]]
        updates += [update_message(t, "error", f"failed {t}") for t in ids[10:20]]
        stack.produce(updates, partition=0)
        stack.produce(
            [update_message(t, "completed", f"retried {t}") for t in ids[10:15]], partition=0
        )
        # Repeated identical updates are unchanged, an unknown task is dead-lettered: no event.
        stack.produce([update_message(t, "completed", f"page {t}") for t in ids[:5]])
        stack.produce([update_message(uuid.uuid4(), "completed", "lost")])
        wait_for(stack.all_committed, timeout_s=30, what="everything committed")
        wait_for(
            lambda: len(stream(redis_server, name)) >= 30 + 10 + 10 + 5,
            what="every transition on the stream",
        )
        watched, _ = watcher.communicate(timeout=30)
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
        code = tm.stop()
    assert code == 0, tm.output()
    events = stream(redis_server, name)
    got = by_task(events)
    expected = {str(t): ["new", "completed"] for t in ids[:10]}
    expected |= {str(t): ["new", "error", "completed"] for t in ids[10:15]}
    expected |= {str(t): ["new", "error"] for t in ids[15:20]}
    expected |= {str(t): ["new"] for t in ids[20:]}
    assert got == expected
    assert len(events) == 55  # once each: nothing for duplicates, unchanged or dead letters
    first = next(e for e in events if e["task_id"] == str(ids[0]) and e["status"] == "new")
    assert first["trace_id"] == TRACE_ID and first["at"] == "2026-01-02T03:04:05.678Z"
    finished = next(e for e in events if e["task_id"] == str(ids[0]) and e["status"] == "completed")
    assert finished["at"] == "2026-01-02T04:05:06.789Z" and "trace_id" not in finished
    # How long after its transaction a transition reached the stream (reported, not asserted:
    # no timed assertions; the README quotes it). updated_at is the transaction's start.
    entry_ms = {
        fields["task_id"]: int(entry_id.split("-")[0])
        for entry_id, fields in entries(redis_server, name)
        if fields["status"] == "completed"
    }
    rows = stack.query(
        "SELECT id::text, extract(epoch FROM updated_at) * 1000 FROM web_crawl_tasks"
        " WHERE status = 'completed'"
    )
    lags = sorted(entry_ms[r[0]] - float(r[1]) for r in rows if r[0] in entry_ms)
    print(f"commit -> stream: median {lags[len(lags) // 2]:.1f} ms, max {lags[-1]:.1f} ms")
    assert watched.splitlines() == [
        f"2026-01-02T04:05:06.789Z {ids[10]} error",
        f"2026-01-02T04:05:06.789Z {ids[10]} completed",
    ]


def test_redis_down_costs_events_never_consumption(
    stack: Stack, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = feed_env(redis_server)
    name = env["TM_REDIS_STREAM"]
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", **FAST, **env)
    try:
        tm.wait_assigned(stack.partitions)
        first = [uuid.uuid4() for _ in range(200)]
        stack.produce([new_message(t, n) for n, t in enumerate(first)])
        wait_for(lambda: len(stream(redis_server, name)) == 200, what="200 events")

        redis_server.kill()
        down = [uuid.uuid4() for _ in range(300)]
        stack.produce([new_message(t, 1000 + n) for n, t in enumerate(down)])
        wait_for(lambda: stack.count() == 500, what="consumption goes on without Redis")
        wait_for(stack.all_committed, what="committed without Redis")
        dropped = 'tm_task_events_total{outcome="dropped"}'
        wait_for(lambda: metric(scrape(tm.port), dropped) > 0, what="dropped events counted")
        with urllib.request.urlopen(f"http://127.0.0.1:{tm.port}/api/health/ready", timeout=5) as r:
            assert r.status == 200  # readiness does not depend on Redis

        redis_server.start()  # empty again: no persistence
        # The first batch after the restart may meet the broken connection (dropped, and the
        # client reconnects); a batch after that one gets through.
        after = [uuid.uuid4() for _ in range(100)]
        stack.produce([new_message(t, 2000 + n) for n, t in enumerate(after)])
        wait_for(lambda: stack.count() == 600, what="tasks applied after the restart")
        last = [uuid.uuid4() for _ in range(50)]
        stack.produce([new_message(t, 3000 + n) for n, t in enumerate(last)])
        wait_for(
            lambda: {str(t) for t in last} <= {e["task_id"] for e in stream(redis_server, name)},
            what="events resumed after Redis came back",
        )
    finally:
        code = tm.stop()
    output = tm.output()
    assert code == 0, output
    assert "worker died" not in output, output
    assert "task events: redis unavailable" in output


def test_batches_queued_during_a_call_go_together_in_the_next(
    redis_server: RedisServer,
) -> None:
    # A slow Redis must cost fewer round trips, not one per batch: three batches waiting when
    # the feed's task runs go in one script call, in their order.
    from tm.adapters.redis import _SEND_SCRIPT, TaskEvents  # redis-py: only where it is used
    from tm.connections import RedisSettings
    from tm.core.messages import TaskEvent

    name = unique("tm:events")
    client = redis_server.client()
    client.script_load(_SEND_SCRIPT)
    client.config_resetstat()
    batches: list[list[TaskEvent]] = [
        [(f"task-{b}-{i}", "new", "2026-01-02T03:04:05.678Z", None) for i in range(3)]
        for b in range(3)
    ]

    async def feed() -> None:
        events = TaskEvents(RedisSettings(url=redis_server.url, stream=name, stream_maxlen=1000))
        for batch in batches:
            events.publish(batch)
        events.start()
        await events.close(timeout_s=10)

    asyncio.run(feed())
    assert [e["task_id"] for e in stream(redis_server, name)] == [
        task for batch in batches for task, *_ in batch
    ]
    assert client.info("commandstats")["cmdstat_evalsha"]["calls"] == 1


def test_a_bad_redis_url_stops_startup_with_one_line(stack: Stack, tmp_path: Path) -> None:
    tm = TmRun(stack, tmp_path, REDIS_URL="http://127.0.0.1:6379")
    code = tm.process.wait(30)
    tm.close()
    lines = [line for line in tm.output().splitlines() if line.strip()]
    assert code == 2
    assert lines == [
        "tm: REDIS_URL='http://127.0.0.1:6379' is invalid: expected"
        " redis://[user:password@]host[:port][/db]"
    ]


def test_a_channel_message_is_its_stream_entry_as_json_and_the_stream_is_trimmed(
    redis_server: RedisServer,
) -> None:
    # The script joins each channel message from its parts and trims the stream once per call:
    # every message must parse to exactly its entry's fields (with and without a trace id),
    # and the stream must keep the newest events, about MAXLEN of them.
    from tm.adapters.redis import TaskEvents  # redis-py: only where it is used
    from tm.connections import RedisSettings
    from tm.core.messages import TaskEvent

    name, maxlen = unique("tm:events"), 100
    listener = redis_server.client().pubsub()
    listener.psubscribe("tm:task:*")
    assert listener.get_message(timeout=5)["type"] == "psubscribe"
    batches: list[list[TaskEvent]] = [
        [
            (str(uuid.uuid4()), "new", "2026-01-02T03:04:05.678Z", TRACE_ID if i % 2 else None)
            for i in range(150)
        ]
        for _ in range(4)
    ]

    async def feed() -> None:
        events = TaskEvents(RedisSettings(url=redis_server.url, stream=name, stream_maxlen=maxlen))
        for batch in batches:
            events.publish(batch)
        events.start()  # the batches go in one call, trimmed at its end
        await events.close(timeout_s=10)

    asyncio.run(feed())
    sent = [event for batch in batches for event in batch]
    messages: list[tuple[str, Any]] = []
    while len(messages) < len(sent):
        message = listener.get_message(timeout=5)
        assert message is not None, f"{len(messages)} of {len(sent)} channel messages"
        messages.append((message["channel"], orjson.loads(message["data"])))
    expected = [
        {"task_id": task, "status": status, "at": at} | ({"trace_id": trace} if trace else {})
        for task, status, at, trace in sent
    ]
    assert messages == [(f"tm:task:{e['task_id']}", e) for e in expected]
    kept = stream(redis_server, name)
    assert maxlen <= len(kept) < 2 * maxlen  # `~`: whole nodes of 100 entries go
    assert kept == expected[-len(kept) :]
