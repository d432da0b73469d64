"""The image against the secured stack, its certificate and secrets mounted read-only as the
StatefulSet mounts the Secret tm-tls (k8s/base/statefulset.yaml: /etc/tm/tls, files readable
by the pod's group only): SCRAM over TLS to Kafka, verify-full to PostgreSQL, the passwords
read from files, none of them in the environment or the logs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import free_port, unique, wait_for
from harness.stack import Stack
from tests.container.conftest import PODMAN, Podman
from tests.secure.conftest import Secure, secured_stack
from tests.secure.test_secured import get
from tm import traffic

pytestmark = pytest.mark.e2e

TASKS = 300
MOUNT = "/etc/tm/tls"
UID = 10001  # the image's user and group


def _secret_volume(secure: Secure, where: Path) -> Path:
    """The files of a Secret volume: root's, group 10001 (fsGroup), mode 0440 (defaultMode)."""
    where.mkdir()
    files = {
        "ca.pem": Path(secure.file("ca.pem")).read_bytes(),
        "kafka-password": secure.scram_password.encode(),
        "postgres-password": secure.postgres_password.encode(),
    }
    for name, data in files.items():
        (where / name).write_bytes(data)
        shutil.chown(where / name, "root", UID)
        (where / name).chmod(0o440)
    os.chmod(where, 0o755)  # noqa: S103 (a directory of a Secret volume: world-traversable)
    return where


def test_the_image_runs_against_the_secured_stack_with_its_secret_mounted(
    podman: Podman, secure: Secure, tmp_path: Path
) -> None:
    kafka_env = {
        **secure.scram_env(),
        "KAFKA_SASL_PASSWORD_FILE": f"{MOUNT}/kafka-password",
        "KAFKA_SSL_CA_LOCATION": f"{MOUNT}/ca.pem",
    }
    postgres_env = {
        **secure.postgres_env(),
        "POSTGRES_PASSWORD_FILE": f"{MOUNT}/postgres-password",
        "POSTGRES_SSL_ROOT_CERT": f"{MOUNT}/ca.pem",
    }
    # The tests' own clients read the host's files; the container only its mount.
    for stack in secured_stack(secure.scram_env(), secure.postgres_env()):
        volume = _secret_volume(secure, tmp_path / "tls")
        env = {**stack.env, **kafka_env, **postgres_env, "POSTGRES_DB": stack.database}
        run_image(podman, stack, secure, tmp_path, volume, env)


def container_output(name: str) -> str:
    """Everything the container wrote, standard output and error."""
    done = subprocess.run(
        [*PODMAN, "logs", name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False
    )
    return done.stdout.decode(errors="replace")


def run_image(
    podman: Podman, stack: Stack, secure: Secure, tmp_path: Path, volume: Path, env: dict[str, str]
) -> None:
    name = unique("tm-secure").replace("_", "-")
    port = free_port()
    env = {**env, "APP_PORT": str(port), "TM_WORKERS": "1", "NODE_ENV": "production"}
    env_file = tmp_path / "tm.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
    podman.run(
        "run", "--detach", "--name", name, "--network", "host",
        "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp",  # noqa: S108
        "--user", f"{UID}:{UID}", "--cap-drop", "all", "--security-opt", "no-new-privileges",
        *podman.ulimits,
        "--volume", f"{volume}:{MOUNT}:ro",
        "--env-file", str(env_file),
        podman.image,
    )  # fmt: skip
    try:
        wait_for(lambda: get(port, "/api/health/ready")[0] == 200, timeout_s=90, what="ready")
        stack.produce([(None, *traffic.new_task_message(n)) for n in range(TASKS)])
        wait_for(stack.all_committed, timeout_s=90, what=f"{TASKS} tasks committed")
        podman.run("stop", "--time", "45", name, timeout_s=90)
        state = podman.inspect("container", name)["State"]
    finally:
        logs = container_output(name)
        print(logs[-3000:])
        podman.run("rm", "--force", "--time", "0", name, check=False)
    assert state["ExitCode"] == 0, logs
    assert stack.count() == TASKS
    assert secure.scram_password not in logs and secure.postgres_password not in logs
    assert secure.scram_password not in env_file.read_text()
