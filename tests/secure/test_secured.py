"""tm against secured servers, as production clusters are: Kafka over TLS with SCRAM, with mutual
TLS and with OAUTHBEARER (OIDC client credentials), PostgreSQL with ``verify-full``, Redis over
TLS. Each listener carries tasks end to end; each wrong setting stops `tm run` before any worker
starts with one line naming it, consuming and committing nothing; no secret is ever shown.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import unique, wait_for
from harness.stack import Stack
from harness.tm import TmRun
from tests.secure.conftest import Secure, TokenEndpoint, secured_stack
from tm.traffic import new_task_message

pytestmark = pytest.mark.e2e

TASKS = 120


def produce_new(stack: Stack, count: int) -> None:
    messages = []
    for n in range(count):
        headers, value = new_task_message(n)
        messages.append((None, headers, value))
    stack.produce(messages)


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def run_through(stack: Stack, tmp_path: Path, secrets: list[str], **env: str) -> None:
    """`tm run` applies, publishes and commits every task over the stack's secured servers,
    reports its dependencies up, and shows none of ``secrets`` in its logs, health or metrics."""
    produce_new(stack, TASKS)
    tm = TmRun(stack, tmp_path, TM_WORKERS="1", **env)
    try:
        wait_for(stack.all_committed, timeout_s=90, what="every task committed")
        wait_for(lambda: get(tm.port, "/api/health/ready")[0] == 200, what="ready")
        status, detailed = get(tm.port, "/api/health/detailed")
        _, metrics = get(tm.port, "/metrics")
    finally:
        assert tm.stop() == 0, tm.output()
    assert stack.count() == TASKS
    requests = stack.read_topic(stack.requests_topic)  # an authenticated client reads them
    assert len(requests) == TASKS
    assert status == 200
    checks = json.loads(detailed)["checks"]
    assert checks["database"]["status"] == "up" and checks["kafka"]["status"] == "up"
    shown = tm.output() + detailed.decode() + metrics.decode()
    for secret in secrets:
        assert secret not in shown


@pytest.fixture
def scram_stack(secure: Secure) -> Iterator[Stack]:
    yield from secured_stack(secure.scram_env(), secure.postgres_env())


@pytest.mark.parametrize("mechanism", ["scram-sha-256", "scram-sha-512"])
def test_tm_carries_tasks_over_scram_and_tls_with_postgres_verify_full(
    secure: Secure, tmp_path: Path, mechanism: str
) -> None:
    for stack in secured_stack(secure.scram_env(mechanism), secure.postgres_env()):
        run_through(
            stack,
            tmp_path,
            [secure.scram_password, secure.postgres_password],
            KAFKA_SASL_MECHANISM=mechanism,
        )


def test_tm_carries_tasks_over_mutual_tls(secure: Secure, tmp_path: Path) -> None:
    for stack in secured_stack(secure.mtls_env(), secure.postgres_env()):
        run_through(stack, tmp_path, [secure.postgres_password])


def test_tm_authenticates_to_postgres_with_a_client_certificate(
    secure: Secure, tmp_path: Path
) -> None:
    """pg_hba's ``cert`` method for the stack's certificate user: no password at all."""
    for stack in secured_stack(secure.mtls_env(), secure.postgres_cert_env()):
        run_through(stack, tmp_path, [])
        user = stack.query("SELECT current_user")[0][0]
        assert user == secure.raw["postgres"]["cert_user"]


def test_tm_carries_tasks_over_oauthbearer_with_tokens_from_the_token_endpoint(
    secure: Secure, token_endpoint: TokenEndpoint, tmp_path: Path
) -> None:
    for stack in secured_stack(secure.oauth_env(token_endpoint), secure.postgres_env()):
        run_through(stack, tmp_path, [token_endpoint.client_secret, secure.postgres_password])
    assert token_endpoint.issued >= 1
    assert token_endpoint.refused == 0


def test_task_events_reach_redis_over_tls(
    scram_stack: Stack, secure: Secure, tmp_path: Path
) -> None:
    import redis

    stream = unique("tm:secure-events")
    url = f"rediss://:{secure.redis_password}@localhost:{secure.port('redis')}/0"
    env = {"REDIS_URL": url, "REDIS_SSL_CA_FILE": secure.file("ca.pem"), "TM_REDIS_STREAM": stream}
    client = redis.Redis.from_url(url, ssl_ca_certs=secure.file("ca.pem"), decode_responses=True)
    try:
        run_through(scram_stack, tmp_path, [secure.redis_password], **env)
        wait_for(lambda: client.xlen(stream) >= TASKS, what="the task events in the stream")
    finally:
        client.delete(stream)
        client.close()


# -- refused settings: one line, exit 1 before any worker, nothing consumed or committed ----------


def refused(stack: Stack, tmp_path: Path, **env: str) -> str:
    """`tm run` with ``env`` over the stack: it must exit 1 before any worker starts, leaving
    the waiting message unconsumed; returns its output."""
    produce_new(stack, 1)
    tm = TmRun(stack, tmp_path, TM_WORKERS="1", **env)
    try:
        code = tm.process.wait(120)
    finally:
        tm.close()
    output = tm.output()
    assert code == 1, output
    assert "worker spawned" not in output
    assert stack.count() == 0
    assert all(offset < 0 for offset in stack.committed().values())
    return output


def problem_line(output: str) -> str:
    """The one line that says why tm did not start (the pre-flight's answer)."""
    lines = [line for line in output.splitlines() if "cannot start" in line]
    assert len(lines) == 1, output
    return lines[0]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"KAFKA_SASL_PASSWORD_FILE": "", "KAFKA_SASL_PASSWORD": "wrong-password"},
         "KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD"),
        ({"KAFKA_SASL_USERNAME": "nobody"}, "KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD"),
        ({"KAFKA_SECURITY_PROTOCOL": "sasl_plaintext", "KAFKA_SSL_CA_LOCATION": ""},
         "KAFKA_BROKERS, KAFKA_SECURITY_PROTOCOL"),
        ({"KAFKA_SSL_CA_LOCATION": "OTHER_CA"}, "KAFKA_SSL_CA_LOCATION"),
        ({"KAFKA_BROKERS": "127.0.0.1:SCRAM_PORT"}, "KAFKA_SSL_VERIFY_HOSTNAME"),
        ({"POSTGRES_HOST": "127.0.0.1"}, "POSTGRES_SSL_ROOT_CERT, POSTGRES_HOST"),
        ({"POSTGRES_SSLMODE": "disable"}, "POSTGRES_SSLMODE"),
    ],
    ids=[
        "wrong-sasl-password",
        "unknown-user",
        "plaintext-to-tls-port",
        "ca-that-did-not-sign-the-broker",
        "broker-certificate-for-another-host",
        "postgres-verify-full-wrong-host",
        "postgres-plaintext-refused",
    ],
)  # fmt: skip
def test_a_refused_setting_stops_tm_with_one_line_naming_it(
    scram_stack: Stack,
    secure: Secure,
    other_ca: Path,
    tmp_path: Path,
    change: dict[str, str],
    named: str,
) -> None:
    env = {
        name: value.replace("OTHER_CA", str(other_ca)).replace(
            "SCRAM_PORT", str(secure.port("kafka_scram"))
        )
        for name, value in change.items()
    }
    output = refused(scram_stack, tmp_path, **env)
    line = problem_line(output)
    assert named in line
    for secret in (secure.scram_password, secure.postgres_password, "wrong-password"):
        assert secret not in output


def test_an_expired_client_certificate_stops_tm_naming_the_certificate(
    secure: Secure, tmp_path: Path
) -> None:
    from stack import certs

    ca = certs.Issued(
        Path(secure.file("ca.pem")).read_bytes(), Path(secure.file("ca.key")).read_bytes()
    )
    long_ago = certs.now() - 30 * certs.DAY
    cert, key = certs.issue(
        ca, "tm", client=True, not_before=long_ago, not_after=long_ago + certs.DAY
    ).write(tmp_path, "expired")
    for stack in secured_stack(secure.mtls_env(), secure.postgres_env()):
        output = refused(
            stack,
            tmp_path,
            KAFKA_SSL_CERTIFICATE_LOCATION=str(cert),
            KAFKA_SSL_KEY_LOCATION=str(key),
        )
        assert "KAFKA_SSL_CERTIFICATE_LOCATION" in problem_line(output)


def test_a_refused_oauth_client_secret_stops_tm_naming_the_client_settings(
    secure: Secure, token_endpoint: TokenEndpoint, tmp_path: Path
) -> None:
    env = secure.oauth_env(token_endpoint, secret="not-the-secret")
    for stack in secured_stack(secure.oauth_env(token_endpoint), secure.postgres_env()):
        output = refused(stack, tmp_path, **env)
        line = problem_line(output)
        assert "KAFKA_SASL_OAUTHBEARER_CLIENT_ID, KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET" in line
        assert "not-the-secret" not in output
    assert token_endpoint.refused >= 1


def test_tm_check_names_a_wrong_password_and_never_shows_it(
    scram_stack: Stack, secure: Secure
) -> None:
    env = {**scram_stack.env, "KAFKA_SASL_PASSWORD_FILE": "", "KAFKA_SASL_PASSWORD": "s3cr3t-pw"}
    done = subprocess.run(
        [sys.executable, "-m", "tm", "check"],
        env={**_environ(), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    postgres_line, kafka_line = done.stdout.splitlines()
    assert postgres_line.startswith("postgres: reached")
    assert kafka_line.startswith("kafka: NOT reached: KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD")
    assert "s3cr3t-pw" not in done.stdout + done.stderr
    assert secure.postgres_password not in done.stdout + done.stderr


def _environ() -> dict[str, Any]:
    import os

    return dict(os.environ)


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    """A CA that signed nothing of the stack's."""
    from stack import certs

    path = tmp_path / "other-ca.pem"
    path.write_bytes(certs.make_ca("another CA").cert)
    return path


def served_certificate(port: int, ca: str) -> bytes:
    """The DER certificate a TLS server on ``port`` presents (checked against ``ca``)."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=ca)
    with (
        socket.create_connection(("localhost", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_a_rotated_server_certificate_is_taken_without_a_restart_of_tm(
    scram_stack: Stack, secure: Secure, tmp_path: Path
) -> None:
    """A new server certificate from the same CA while tm runs: PostgreSQL reloads it and tm's
    sessions are ended (new ones verify the new certificate); the broker restarts with it. tm
    goes on with the same workers, and every task before and after is applied once."""
    import ssl

    from stack import secure as secured

    stack = scram_stack
    produce_new(stack, TASKS)
    tm = TmRun(stack, tmp_path, TM_WORKERS="1")
    try:
        wait_for(stack.all_committed, timeout_s=90, what="the first tasks committed")
        before = served_certificate(secure.port("kafka_scram"), secure.file("ca.pem"))
        secured.rotate()
        stack.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'tm' AND datname = $1 AND pid <> pg_backend_pid()",
            stack.database,
        )
        after = served_certificate(secure.port("kafka_scram"), secure.file("ca.pem"))
        messages = []
        for n in range(TASKS, 2 * TASKS):
            headers, value = new_task_message(n)
            messages.append((None, headers, value))
        stack.produce(messages)
        wait_for(stack.all_committed, timeout_s=120, what="the tasks after the rotation")
        assert tm.process.poll() is None, tm.output()
    finally:
        assert tm.stop() == 0, tm.output()
    assert before != after
    assert after == ssl.PEM_cert_to_DER_cert(Path(secure.file("server.pem")).read_text())
    assert stack.count() == 2 * TASKS
    assert tm.output().count("worker spawned") == 1
