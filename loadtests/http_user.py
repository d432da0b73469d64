"""The HTTP side of the load test: an operator's and a monitoring system's calls on tm's API,
with the bearer token of ``API_TOKEN`` on ``/api/tasks*``."""

from __future__ import annotations

import os
import random

from locust import FastHttpUser, constant_throughput, task

from loadtests import kafka_user
from loadtests.options import LoadOptions

OPTIONS = LoadOptions.from_env()
HEALTH_PATHS = (
    "/api/health",
    "/api/health/detailed",
    "/api/health/database",
    "/api/health/kafka",
    "/api/health/service",
    "/api/health/ready",
    "/api/health/live",
)
PAGES = 3  # pages walked per listing, following `next`
PAGE_LIMIT = 100
STATUSES = ("", "new", "completed", "error")


class ApiUser(FastHttpUser):
    """LOAD_HTTP_USERS of them (a fixed count), LOAD_HTTP_RATE requests a second each."""

    fixed_count = OPTIONS.http_users
    wait_time = constant_throughput(OPTIONS.http_rate)

    def on_start(self) -> None:
        token = os.environ.get("API_TOKEN", "")
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}

    @task(4)
    def health(self) -> None:
        self.client.get(random.choice(HEALTH_PATHS))

    @task(2)
    def task_counts(self) -> None:
        path = random.choice(("/api/metrics", "/api/metrics?hours=1"))
        self.client.get(path, name="/api/metrics")

    @task(1)
    def prometheus(self) -> None:
        self.client.get("/metrics")

    @task(3)
    def task_by_id(self) -> None:
        traffic = kafka_user.TRAFFIC
        task_id = traffic.some_task_id() if traffic is not None else None
        if task_id is None:
            return
        self.client.get(f"/api/tasks/{task_id}", headers=self.auth, name="/api/tasks/{id}")

    @task(2)
    def pages(self) -> None:
        status = random.choice(STATUSES)
        query = f"limit={PAGE_LIMIT}" + (f"&status={status}" if status else "")
        after = ""
        for page in range(PAGES):
            name = "/api/tasks (first page)" if page == 0 else "/api/tasks?after= (next page)"
            with self.client.get(
                f"/api/tasks?{query}{after}", headers=self.auth, name=name, catch_response=True
            ) as reply:
                if reply.status_code != 200:
                    reply.failure(f"HTTP {reply.status_code}")
                    return
                cursor = (reply.json() or {}).get("next")
            if not cursor:
                return
            after = f"&after={cursor}"
