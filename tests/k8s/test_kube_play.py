"""`podman kube play` of the StatefulSet's pod, rendered from k8s/overlays/test: the pod spec
itself runs on this machine (the image of `make image`, env from the ConfigMap and the Secret,
the init container, the emptyDir volumes, the security context, the CPU limit) against the
local stack on the host's network, and consumes; then `podman kube down`.

The pod is the one the StatefulSet would make (podman has no StatefulSet): its template under
a pod name of the StatefulSet's form, with this test's database (empty: the init container
migrates it), topics, group and a free APP_PORT put into the rendered ConfigMap.

podman 4.3 (Debian 12) stores a Secret document of the YAML in its secret store as YAML and then
reads it back as JSON, so envFrom of it fails; the test puts the rendered Secret's data into
the store in the JSON podman reads instead (`podman secret create`), under the same name.
Skips only where podman cannot run at all.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka.admin import AdminClient

from harness import free_port, wait_for
from harness.stack import Stack, admin_sql, make_stack
from tests.k8s.conftest import ROOT, Obj, build, one, secret_data, tm_config
from tm import traffic
from tm.adapters import kafka
from tm.config import Settings

pytestmark = pytest.mark.e2e

TASKS = 1000


@dataclasses.dataclass
class Podman:
    env: dict[str, str]
    image: str

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        done = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check:
            assert done.returncode == 0, f"podman {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done.stdout

    def inspect(self, name: str) -> dict[str, Any]:
        return json.loads(self.run("container", "inspect", name))[0]  # type: ignore[no-any-return]


def _bash(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "stack" / script), *args],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )


@pytest.fixture(scope="module")
def podman() -> Podman:
    image = _bash("image.sh")  # make image: builds localhost/tm:latest, or finds it current
    if shutil.which("podman") is None:
        pytest.skip(
            f"podman is not installed and stack/image.sh could not install it:\n{image.stderr}"
        )
    assert image.returncode == 0, f"stack/image.sh failed:\n{image.stderr}"
    play = _bash("k8s.sh", "kube-play")
    assert play.returncode == 0, f"stack/k8s.sh kube-play failed:\n{play.stderr}"
    env = {**os.environ, "CONTAINERS_CONF": play.stdout.strip()}
    info = subprocess.run(
        ["podman", "info"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()}")
    return Podman(env=env, image=image.stdout.split()[-1])


@pytest.fixture
def stack(settings: Settings, pg_up: None, kafka_up: None) -> Iterator[Stack]:
    """Fresh topics, and a fresh database left empty: the pod's init container migrates it."""
    with make_stack(settings) as made:
        database = f"{made.database}_pod"
        admin_sql(settings, f'CREATE DATABASE "{database}"')
        try:
            yield dataclasses.replace(
                made, database=database, env={**made.env, "POSTGRES_DB": database}
            )
        finally:
            admin_sql(settings, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def pod_of(
    objects: list[Obj],
    *,
    name: str,
    config: dict[str, str],
    secret: str,
    tls: str,
    template: Obj | None = None,
) -> list[Obj]:
    """The ConfigMap (with ``config`` merged in) and the pod ``name`` that the StatefulSet would
    make from its template (or that ``template`` describes), its secretRefs renamed to
    ``secret``, its Secret volume to ``tls``, its ports as podman needs."""
    config_map = copy.deepcopy(tm_config(objects))
    config_map["data"].update(config)
    if template is None:
        template = one(objects, "StatefulSet", "tm")["spec"]["template"]
    template = copy.deepcopy(template)
    spec = template["spec"]
    for container in spec.get("initContainers", []) + spec["containers"]:
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                source["secretRef"]["name"] = secret
        # podman 4.3 turns every containerPort into a port mapping, which it refuses on the
        # host's network (Kubernetes lists them and maps nothing): drop them, and give the
        # probes the port number their name stands for (APP_PORT).
        named = {p["name"]: int(config["APP_PORT"]) for p in container.pop("ports", [])}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe in container:
                get = container[probe]["httpGet"]
                get["port"] = named.get(get["port"], get["port"])
    labels = {**template["metadata"]["labels"], "statefulset.kubernetes.io/pod-name": name}
    # podman 4.3 gives the init container the pod's restartPolicy: with Always (a
    # StatefulSet's) it restarts `tm db migrate` as soon as it exits, then fails to remove
    # it ("cannot remove container ... as it is running"). OnFailure runs it once, and still
    # restarts tm if it crashes.
    spec["restartPolicy"] = "OnFailure" if spec.get("restartPolicy") != "Never" else "Never"
    # podman makes an emptyDir a named volume of the volume's name, shared by every pod on the
    # machine (and tm empties its metrics directory at start): one per pod, as in Kubernetes.
    for volume in spec["volumes"]:
        if "secret" in volume:  # the certificates' Secret: a podman secret of the test's
            volume["secret"]["secretName"] = tls
            continue
        assert "emptyDir" in volume, volume
        renamed = f"{name}-{volume['name']}"
        for container in spec.get("initContainers", []) + spec["containers"]:
            for mount in container.get("volumeMounts", []):
                if mount["name"] == volume["name"]:
                    mount["name"] = renamed
        volume["name"] = renamed
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }
    return [config_map, pod]


def _podman_secret(secret: Obj) -> dict[str, str]:
    """What podman 4.3 reads for envFrom and Secret volumes: a JSON object of base64 values,
    the Secret's ``data``."""
    return {k: base64.b64encode(v.encode()).decode() for k, v in secret_data(secret).items()}


def _create_secrets(
    podman: Podman, objects: list[Obj], directory: Path, *, secret: str, tls: str
) -> None:
    """The rendered Secrets tm-secrets and tm-tls in podman's store as ``secret`` and ``tls``
    (removed by the test)."""
    for rendered, name in (("tm-secrets", secret), ("tm-tls", tls)):
        path = directory / f"{name}.json"
        path.write_text(json.dumps(_podman_secret(one(objects, "Secret", rendered))))
        podman.run("secret", "create", name, str(path))


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)  # noqa: S310 (http://127.0.0.1 only)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def test_the_statefulset_pod_runs_under_podman_kube_play_and_consumes(
    podman: Podman, stack: Stack, kustomize: str, tmp_path: Path
) -> None:
    objects = build(kustomize, "test")
    rendered_secret = one(objects, "Secret", "tm-secrets")
    token = secret_data(rendered_secret)["API_TOKEN"]
    suffix = uuid.uuid4().hex[:8]
    name = f"tm-{suffix}-0"  # a StatefulSet tm-<suffix>'s first pod: unique on this machine
    secret, tls = f"tm-secrets-{suffix}", f"tm-tls-{suffix}"
    port = free_port()
    config = {**stack.env, "APP_PORT": str(port)}
    documents = pod_of(objects, name=name, config=config, secret=secret, tls=tls)
    play_file = tmp_path / "pod.yaml"
    play_file.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    _create_secrets(podman, objects, tmp_path, secret=secret, tls=tls)
    try:
        podman.run("kube", "play", str(play_file), timeout=300)
        _check_pod(podman, stack, name=name, port=port, token=token)
        # SIGTERM to PID 1 (the supervisor): it drains and exits 0 within the grace period.
        podman.run("pod", "stop", "--time", "45", name, timeout=120)
        state = podman.inspect(f"{name}-tm")["State"]
        assert state["ExitCode"] == 0, podman.run("logs", f"{name}-tm", check=False)
    finally:
        logs = podman.run("logs", f"{name}-tm", check=False)
        podman.run("kube", "down", str(play_file), timeout=120, check=False)
        podman.run("secret", "rm", secret, tls, check=False)
        print(logs[-4000:])
    assert '"message":"stopped"' in logs and '"clean":true' in logs, logs[-2000:]


def _check_pod(podman: Podman, stack: Stack, *, name: str, port: int, token: str) -> None:
    main = f"{name}-tm"

    def ready() -> bool:
        running = podman.inspect(main)["State"]["Running"]
        assert running, podman.run("logs", main, check=False)
        return _get(f"http://127.0.0.1:{port}/api/health/ready")[0] == 200

    wait_for(ready, timeout_s=90, what="GET /api/health/ready to answer 200")
    # The init container migrated the empty database before tm started (podman removes it).
    applied = stack.query("SELECT count(*) FROM tm_schema_migrations")[0][0]
    assert applied >= 1

    # What podman made of the pod spec's security context and resources.
    inspected = podman.inspect(main)
    host = inspected["HostConfig"]
    assert inspected["Config"]["User"] in ("10001", "10001:10001"), inspected["Config"]["User"]
    assert host["ReadonlyRootfs"] is True
    assert "no-new-privileges" in " ".join(host.get("SecurityOpt") or [])
    assert {c.upper().removeprefix("CAP_") for c in host["CapDrop"] or []} >= {"NET_RAW", "CHOWN"}
    assert host["Memory"] > 0 and host["NanoCpus"] + host.get("CpuQuota", 0) > 0
    top = podman.run("top", main, "pid", "user", "args")
    pid1 = next(line for line in top.splitlines()[1:] if line.split()[0] == "1")
    assert pid1.split()[1] == "10001" or "tm" in pid1.split()[1], top
    assert "tm run" in pid1 or "/opt/tm/bin/tm" in pid1, top

    # The CPU limit (1) is the worker count: TM_WORKERS is unset.
    status, body = _get(f"http://127.0.0.1:{port}/api/health/service")
    assert status == 200, body
    service = json.loads(body)["details"]
    assert service["workersExpected"] == 1 and len(service["workers"]) == 1, body

    # The Secret's API_TOKEN guards /api/tasks.
    assert _get(f"http://127.0.0.1:{port}/api/tasks")[0] == 401
    assert _get(f"http://127.0.0.1:{port}/api/tasks", token)[0] == 200

    # KAFKA_GROUP_INSTANCE_ID is the pod's name: worker 0 is the static member <pod>-0.
    admin = AdminClient(kafka.client_config(stack.settings.kafka))
    group = admin.describe_consumer_groups([stack.group])[stack.group].result(10)
    assert {m.group_instance_id for m in group.members} == {f"{name}-0"}

    # It consumes: rows, crawl requests, committed offsets.
    stack.produce([(None, *traffic.new_task_message(n)) for n in range(TASKS)])
    wait_for(lambda: stack.count() == TASKS, timeout_s=60, what=f"{TASKS} rows")
    wait_for(stack.all_committed, timeout_s=30, what="every message committed")
    requests = stack.read_topic(stack.requests_topic)
    assert len(requests) == TASKS


def test_the_prune_cronjob_pod_runs_under_podman_kube_play_and_prunes(
    podman: Podman, settings: Settings, pg_up: None, kafka_up: None, kustomize: str, tmp_path: Path
) -> None:
    """The CronJob's pod (its job template, as the Job it makes would run it) against a migrated
    database with old finished tasks, old `new` ones and recent ones: it deletes the old finished
    tasks only, records its run, and exits 0."""
    objects = build(kustomize, "test")
    cron = one(objects, "CronJob", "tm-prune")
    template = copy.deepcopy(cron["spec"]["jobTemplate"]["spec"]["template"])
    template["spec"]["restartPolicy"] = "Never"  # a failure shows as the exit code, not a retry
    suffix = uuid.uuid4().hex[:8]
    name = f"tm-prune-{suffix}"
    secret, tls = f"tm-secrets-{suffix}", f"tm-tls-{suffix}"
    with make_stack(settings) as stack:
        stack.query(
            "INSERT INTO web_crawl_tasks (user_email, user_query, original_url, received_at,"
            " status, created_at) SELECT 'a@example.com', 'q', 'https://example.com', now(), s,"
            " now() - d * interval '1 day' FROM (VALUES ('completed'::task_status, 40, 7),"
            " ('error', 45, 3), ('new', 50, 2), ('completed', 2, 4)) v (s, d, n),"
            " generate_series(1, v.n)"
        )
        config = {**stack.env, "TM_RETENTION_DAYS": "30"}
        documents = pod_of(
            objects, name=name, config=config, secret=secret, tls=tls, template=template
        )
        play_file = tmp_path / "prune.yaml"
        play_file.write_text(yaml.safe_dump_all(documents, sort_keys=False))
        _create_secrets(podman, objects, tmp_path, secret=secret, tls=tls)
        container = f"{name}-prune"
        try:
            podman.run("kube", "play", str(play_file), timeout=300)
            wait_for(
                lambda: not podman.inspect(container)["State"]["Running"],
                timeout_s=120,
                what="the prune pod to finish",
            )
            state = podman.inspect(container)["State"]
            logs = podman.run("logs", container, check=False)
        finally:
            podman.run("kube", "down", str(play_file), timeout=120, check=False)
            podman.run("secret", "rm", secret, tls, check=False)
        assert state["ExitCode"] == 0, logs[-4000:]
        left = stack.query("SELECT status::text, count(*) FROM web_crawl_tasks GROUP BY 1")
        assert {row[0]: row[1] for row in left} == {"new": 2, "completed": 4}
        runs = stack.query("SELECT deleted_rows, retention_days FROM tm_prune_runs")
        assert [tuple(row) for row in runs] == [(10, 30)]
    assert '"deleted":10' in logs.replace(" ", ""), logs[-2000:]
