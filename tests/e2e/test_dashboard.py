"""The Grafana dashboard against real data: a real Prometheus (Debian's, with tm's alert rules)
scrapes a real `tm run` (/metrics and /api/metrics) while it applies new tasks and their
updates, dead-letters malformed events, feeds task events to a real Redis and restarts a killed
worker. Every query of every panel then returns a series with a value: a panel that shows
nothing in a real run is a defect. And the picture the README shows is drawn from it.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest

from harness import unique, wait_for
from harness.servers import RedisServer, get_json, prometheus_server, query
from harness.stack import Stack
from harness.tm import TmRun
from stack import dashboard

pytestmark = pytest.mark.e2e

TASKS = 300
MALFORMED = 5
WINDOW = "10m"  # $__rate_interval in the queries: the whole run


def finite(result: list[dict[str, object]]) -> bool:
    values = [float(r["value"][1]) for r in result]  # type: ignore[index]
    return any(math.isfinite(v) for v in values)


def test_every_panel_shows_data_from_a_real_run(stack: Stack, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    tm = TmRun(
        stack,
        tmp_path,
        TM_WORKERS="2",
        REDIS_URL=redis.url,
        TM_REDIS_STREAM=unique("tm:events"),
    )
    try:
        with prometheus_server(tmp_path, tm.port, ("/metrics", "/api/metrics")) as prometheus:

            def series(promql: str) -> list[dict[str, object]]:
                return query(prometheus, dashboard.instantiate(promql, WINDOW))

            def scraping() -> bool:
                up = [r for r in query(prometheus, "up") if r["value"][1] == "1"]
                return len(up) == 2

            try:
                wait_for(scraping, what="prometheus scraping /metrics and /api/metrics")
            except AssertionError:
                targets = get_json(prometheus, "/api/v1/targets")["data"]["activeTargets"]
                raise AssertionError([(t["scrapeUrl"], t["lastError"]) for t in targets]) from None
            tm.wait_assigned(stack.partitions)
            feeder = stack.feed(count=TASKS, rate=100.0, completed_lag=20)
            stack.produce([(None, [("task_type", b"web-crawl")], b"{") for _ in range(MALFORMED)])
            feeder.join()
            wait_for(
                lambda: (
                    finite(series("sum(tm_messages_applied_total)"))
                    and float(series("sum(tm_messages_applied_total)")[0]["value"][1])  # type: ignore[index]
                    >= TASKS + feeder.completed
                ),
                timeout_s=60,
                what="every message applied, as Prometheus sees it",
            )
            # A worker killed: a restart, a rebalance, and the TmWorkerRestarts alert firing.
            os.kill(tm.worker_pids()[0], signal.SIGKILL)
            wait_for(
                lambda: query(prometheus, 'ALERTS{alertname="TmWorkerRestarts"}'),
                timeout_s=60,
                what="TmWorkerRestarts firing",
            )
            tm.wait_assigned(stack.partitions, timeout_s=60)

            empty = []
            for title, expr in dashboard.queries(dashboard.build()):
                result = series(expr)
                if not finite(result):
                    empty.append(f"{title}: {expr} -> {result}")
            assert empty == [], "panels without data:\n" + "\n".join(empty)

            out = tmp_path / "dashboard.png"
            dashboard.draw(f"http://127.0.0.1:{prometheus}", out, minutes=3)
            assert out.stat().st_size > 20_000
    finally:
        code = tm.stop()
        redis.stop()
    assert code == 0, tm.output()
