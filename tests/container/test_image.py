"""The image of `make image` run the way the StatefulSet runs it (k8s/base/statefulset.yaml),
against the local stack on the host's network: `tm run` as PID 1, uid 10001, a read-only root
with tmpfs only where the pod has emptyDirs (/tmp, the metrics directory), all capabilities
dropped, no new privileges, the pod's memory limit, and `--cpus 1`, from which tm must pick
one worker (TM_WORKERS unset). 1,000 tasks become rows and crawl requests; `podman stop` (SIGTERM
to PID 1) drains and the container exits 0 within the pod's grace period, all committed.
"""

from __future__ import annotations

import importlib.metadata
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from harness import free_port, unique, wait_for
from harness.stack import Stack
from tests.container.conftest import Podman
from tm import traffic
from tm.config import Settings

pytestmark = pytest.mark.e2e

TASKS = 1000
GRACE_S = 45  # terminationGracePeriodSeconds of the StatefulSet
METRICS_DIR = "/run/tm/metrics"  # the StatefulSet's emptyDir for PROMETHEUS_MULTIPROC_DIR
SIZE_LIMIT_BYTES = 250_000_000


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (127.0.0.1)
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _env_file(path: Path, settings: Settings, stack: Stack, *, port: int, name: str) -> Path:
    """What the ConfigMap, the Secret and the pod's env give the container: this test's
    database, topics and group, the local stack's addresses, the API on a free port."""
    pg = settings.postgres
    env = {
        "KAFKA_BROKERS": ",".join(settings.kafka.brokers),
        "POSTGRES_HOST": pg.host,
        "POSTGRES_PORT": str(pg.port),
        "POSTGRES_USER": pg.user,
        "POSTGRES_PASSWORD": pg.password,
        **stack.env,
        "APP_PORT": str(port),
        "KAFKA_GROUP_INSTANCE_ID": name,  # metadata.name of the pod
        "PROMETHEUS_MULTIPROC_DIR": METRICS_DIR,
        "NODE_ENV": "production",
    }
    path.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
    return path


def test_the_image_runs_as_the_statefulset_runs_it(
    podman: Podman, stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    name = unique("tm-image").replace("_", "-")
    port = free_port()
    env_file = _env_file(tmp_path / "tm.env", settings, stack, port=port, name=name)
    podman.run(
        "run", "--detach", "--name", name,
        "--network", "host",
        "--read-only", "--read-only-tmpfs=false",  # podman's extra tmpfs on /run, /var/tmp: off
        "--tmpfs", "/tmp", "--tmpfs", METRICS_DIR,  # noqa: S108 (the container's /tmp)
        "--user", "10001:10001",
        "--cap-drop", "all", "--security-opt", "no-new-privileges",
        "--cpus", "1", "--memory", "320m",
        *podman.ulimits,
        "--env-file", str(env_file),
        podman.image,
    )  # fmt: skip
    try:
        _check_running(podman, stack, name=name, port=port)
        started = time.monotonic()
        podman.run("stop", "--time", str(GRACE_S), name, timeout_s=GRACE_S + 30)
        stopped_s = time.monotonic() - started
        state = podman.inspect("container", name)["State"]
        logs = podman.run("logs", name, check=False)
        assert state["ExitCode"] == 0, logs  # 137 had podman killed it at the deadline
        assert stopped_s < GRACE_S, f"stopped in {stopped_s:.1f} s\n{logs}"
        assert "stopped clean=True" in logs, logs
        ends = stack.end_offsets()
        committed = stack.committed()
        assert {p: committed[p] for p in ends if ends[p]} == {p: e for p, e in ends.items() if e}
    finally:
        print(podman.run("logs", name, check=False)[-4000:])
        podman.run("rm", "--force", "--time", "0", name, check=False)


def _check_running(podman: Podman, stack: Stack, *, name: str, port: int) -> None:
    ready = f"http://127.0.0.1:{port}/api/health/ready"
    # The pre-flight, the API process, the worker joining the group: then ready.
    wait_for(lambda: _status(ready) == 200, timeout_s=90, what="/api/health/ready 200")

    # PID 1 is the supervisor itself (exec form, no init, no shell), everything runs as tm.
    top = podman.run("top", name, "pid", "huser", "args").splitlines()
    rows = [line.split(None, 2) for line in top]
    processes = {int(pid): (user, args) for pid, user, args in rows[1:]}
    assert processes[1][1].startswith("/opt/tm/bin/python3 /opt/tm/bin/tm run"), processes
    assert {user for user, _ in processes.values()} == {"10001"}, processes

    # One worker, from the quota of --cpus 1 (this machine has more CPUs than that).
    logs = podman.run("logs", name)
    assert "starting workers=1 " in logs, logs
    assert logs.count("worker spawned") == 1, logs
    seen = podman.run(
        "exec", name, "python3", "-c",
        "import os; from pathlib import Path; from tm import cpus; "
        "print(cpus.cgroup_cpu_limit(Path('/')), cpus.usable(), os.cpu_count())",
    ).split()  # fmt: skip
    assert seen[:2] == ["1", "1"], f"cgroup quota, usable CPUs, CPU count: {seen}"

    stack.produce([(None, *traffic.new_task_message(n)) for n in range(TASKS)])
    wait_for(stack.all_committed, timeout_s=60, what=f"{TASKS} tasks committed")
    assert stack.count() == TASKS
    wait_for(
        lambda: len(stack.read_topic(stack.requests_topic)) >= TASKS,
        timeout_s=30,
        what=f"{TASKS} crawl requests",
    )
    requests = stack.read_topic(stack.requests_topic)
    assert len({message.key() for message in requests}) == TASKS
    assert stack.read_topic(stack.dlq_topic, timeout_s=2) == []
    assert _status(ready) == 200


def test_the_image_is_what_the_manifests_expect(podman: Podman) -> None:
    """uid 10001, `tm run` in exec form, the OCI labels, under 250 MB, and nothing in it that
    only builds: no compiler, no pip, no package lists or caches; the migrations inside."""
    image = podman.inspect("image", podman.image)
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/opt/tm/bin/tm"]
    assert config["Cmd"] == ["run"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == importlib.metadata.version("tm")
    assert labels["org.opencontainers.image.source"]
    assert image["Size"] < SIZE_LIMIT_BYTES, f"{image['Size'] / 1e6:.0f} MB"
    script = """
        for tool in cc gcc g++ make pip pip3 /opt/tm/bin/pip; do
            command -v "$tool" && exit 1
        done
        leftovers="$(ls -A /var/lib/apt/lists /var/cache/apt /root/.cache 2>/dev/null)"
        [ -z "$(echo "$leftovers" | grep -v ':$' | grep .)" ] || { echo "$leftovers"; exit 2; }
        python3 -c 'from tm.adapters import migrations; print(len(migrations.discover()))'
    """
    out = podman.run(
        "run", "--rm", "--network", "none", "--read-only", *podman.ulimits,
        "--entrypoint", "/bin/sh", podman.image, "-c", script,
    )  # fmt: skip
    assert int(out.strip()) >= 5, out
