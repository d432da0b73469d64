"""Servers a test starts for itself, on free ports, and stops: Debian's redis-server (one the
test may kill) and a Prometheus that scrapes a tm."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from harness import HarnessError, free_port, wait_for

RULES = Path(__file__).resolve().parents[1] / "k8s" / "prometheus" / "tm-alerts.yaml"


def get(port: int, path: str) -> tuple[int, str, bytes] | None:
    """GET http://127.0.0.1:<port><path>: status, content type and body; None when nothing
    answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as got:
            return got.status, got.headers.get("Content-Type", ""), got.read()
    except (urllib.error.URLError, ConnectionError):
        return None


def get_json(port: int, path: str) -> Any:
    got = get(port, path)
    return None if got is None else json.loads(got[2])


class RedisServer:
    """Debian's redis-server on a free port, without persistence."""

    def __init__(self, root: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise HarnessError(
                "redis-server missing: run `STACK_REDIS=1 make stack-up` (make test does)"
            )
        self._binary, self._root = binary, root
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                self._binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._root),
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for(self._answers, timeout_s=10, what="redis-server answering")

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=2)

    def kill(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGKILL)
        self._process.wait(10)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(10)


@contextmanager
def prometheus_server(
    tmp_path: Path, target_port: int, paths: Sequence[str] = ("/metrics",)
) -> Iterator[int]:
    """A Prometheus scraping ``paths`` of 127.0.0.1:``target_port`` every second (job "tm"),
    with tm's alert rules; yields its port and stops it afterwards."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise HarnessError(
            "prometheus not found: run `bash stack/tools.sh` (or `apt-get install prometheus`)"
        )
    home = tmp_path / "prometheus"
    home.mkdir()
    shutil.copy(RULES, home / RULES.name)
    config = home / "prometheus.yml"
    # One job per path, all named "tm" as in Kubernetes; a path other than /metrics is told
    # apart by a "scrape" label (else the targets' series, `up` first, would collide).
    jobs = "".join(
        f"  - job_name: tm-{i}\n"
        f"    metrics_path: {path}\n"
        "    relabel_configs:\n"
        "      - target_label: job\n"
        "        replacement: tm\n"
        + (
            ""
            if path == "/metrics"
            else f"      - target_label: scrape\n        replacement: {path}\n"
        )
        + "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n"
        for i, path in enumerate(paths)
    )
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "rule_files:\n"
        f"  - {RULES.name}\n"
        "scrape_configs:\n" + jobs
    )
    port = free_port()
    log = (home / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def ready() -> bool:
        if process.poll() is not None:
            raise HarnessError("prometheus exited:\n" + (home / "prometheus.log").read_text())
        got = get(port, "/-/ready")
        return got is not None and got[0] == 200

    try:
        wait_for(ready, timeout_s=30, what="prometheus ready")
        yield port
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def query(port: int, promql: str) -> list[Any]:
    """The result vector of an instant query (empty while there is none)."""
    got = get_json(port, f"/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    if not got or got.get("status") != "success":
        return []
    result: list[Any] = got["data"]["result"]
    return result
