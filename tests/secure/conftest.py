"""Fixtures of the secured tests: the secured stack that `STACK_SECURE=1 make stack-up` starts
(stack/secure.py), tm's settings for each of its listeners, a fresh database and fresh topics
on it, and the OAuth token endpoint the OAUTHBEARER listener's tokens come from.

When the secured stack is not up the tests fail with one line that says how to start it.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from harness.stack import Stack, make_stack
from stack import certs
from tm import config

ROOT = Path(__file__).resolve().parents[2]
STACK_JSON = ROOT / ".stack" / "secure" / "stack.json"


@dataclass(frozen=True)
class Secure:
    """What stack/secure.py wrote to .stack/secure/stack.json."""

    raw: dict[str, Any]

    def port(self, name: str) -> int:
        return int(self.raw["ports"][name])

    def file(self, name: str) -> str:
        return str(self.raw["tls"][name])

    @property
    def scram_password(self) -> str:
        return Path(self.raw["kafka"]["scram_password_file"]).read_text().strip()

    @property
    def postgres_password(self) -> str:
        return Path(self.raw["postgres"]["password_file"]).read_text().strip()

    @property
    def redis_password(self) -> str:
        return Path(self.raw["redis"]["password_file"]).read_text().strip()

    def postgres_env(self, *, host: str = "localhost") -> dict[str, str]:
        """PostgreSQL with verify-full against the stack's CA, the password from its file."""
        return {
            "POSTGRES_HOST": host,
            "POSTGRES_PORT": str(self.port("postgres")),
            "POSTGRES_USER": "postgres",
            "POSTGRES_DB": "postgres",  # the admin database; each test makes its own
            "POSTGRES_PASSWORD_FILE": self.raw["postgres"]["password_file"],
            "POSTGRES_SSLMODE": "verify-full",
            "POSTGRES_SSL_ROOT_CERT": self.file("ca.pem"),
        }

    def postgres_cert_env(self) -> dict[str, str]:
        """PostgreSQL with verify-full, authenticated by a client certificate, no password."""
        return {
            **self.postgres_env(),
            "POSTGRES_USER": self.raw["postgres"]["cert_user"],
            "POSTGRES_PASSWORD_FILE": "",
            "POSTGRES_SSL_CERT": self.file("postgres-client.pem"),
            "POSTGRES_SSL_KEY": self.file("postgres-client.key"),
        }

    def scram_env(self, mechanism: str = "scram-sha-256") -> dict[str, str]:
        return {
            "KAFKA_BROKERS": f"localhost:{self.port('kafka_scram')}",
            "KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
            "KAFKA_SASL_MECHANISM": mechanism,
            "KAFKA_SASL_USERNAME": self.raw["kafka"]["scram_user"],
            "KAFKA_SASL_PASSWORD_FILE": self.raw["kafka"]["scram_password_file"],
            "KAFKA_SSL_CA_LOCATION": self.file("ca.pem"),
        }

    def mtls_env(self) -> dict[str, str]:
        return {
            "KAFKA_BROKERS": f"localhost:{self.port('kafka_mtls')}",
            "KAFKA_SECURITY_PROTOCOL": "ssl",
            "KAFKA_SSL_CA_LOCATION": self.file("ca.pem"),
            "KAFKA_SSL_CERTIFICATE_LOCATION": self.file("client.pem"),
            "KAFKA_SSL_KEY_LOCATION": self.file("client.key"),
        }

    def oauth_env(self, endpoint: TokenEndpoint, *, secret: str | None = None) -> dict[str, str]:
        return {
            "KAFKA_BROKERS": f"localhost:{self.port('kafka_oauth')}",
            "KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
            "KAFKA_SASL_MECHANISM": "oauthbearer",
            "KAFKA_SSL_CA_LOCATION": self.file("ca.pem"),
            "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": endpoint.url,
            "KAFKA_SASL_OAUTHBEARER_CLIENT_ID": endpoint.client_id,
            "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": secret or endpoint.client_secret,
            "KAFKA_SASL_OAUTHBEARER_SCOPE": "kafka",
        }


@pytest.fixture(scope="session")
def secure() -> Secure:
    if not STACK_JSON.exists():
        pytest.fail("the secured stack is not up: run `STACK_SECURE=1 make stack-up`")
    found = Secure(json.loads(STACK_JSON.read_text()))
    for name in ("kafka_scram", "kafka_mtls", "kafka_oauth", "postgres", "redis"):
        import socket

        try:
            socket.create_connection(("127.0.0.1", found.port(name)), timeout=2).close()
        except OSError:
            pytest.fail(
                f"the secured stack's {name} does not answer: run `STACK_SECURE=1 make stack-up`"
            )
    return found


# -- the OAuth token endpoint ----------------------------------------------------------------


@dataclass
class TokenEndpoint:
    """An identity provider's token endpoint for the client-credentials grant, as librdkafka
    calls it: HTTP Basic with the client id and secret, a form body; it answers an RS256 JWT
    that the broker checks against the stack's JWKS (issuer, audience, expiry)."""

    key: bytes
    kid: str
    issuer: str
    audience: str
    client_id: str = "tm-client"
    client_secret: str = field(
        default_factory=lambda: base64.b32encode(time.time_ns().to_bytes(8, "big")).decode()
    )
    url: str = ""
    issued: int = 0
    refused: int = 0

    def answer(self, authorization: str, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        try:
            scheme, _, encoded = authorization.partition(" ")
            client, _, secret = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            scheme, client, secret = "", "", ""
        if scheme.lower() != "basic" or (client, secret) != (self.client_id, self.client_secret):
            self.refused += 1
            return 401, {"error": "invalid_client"}
        if form.get("grant_type") != ["client_credentials"]:
            return 400, {"error": "unsupported_grant_type"}
        now = int(time.time())
        claims = {
            "sub": client, "iss": self.issuer, "aud": self.audience, "iat": now,
            "exp": now + 3600, "scope": " ".join(form.get("scope", [])),
        }  # fmt: skip
        self.issued += 1
        token = certs.sign_jwt(self.key, self.kid, claims)
        return 200, {"access_token": token, "token_type": "bearer", "expires_in": 3600}


@pytest.fixture
def token_endpoint(secure: Secure) -> Iterator[TokenEndpoint]:
    oauth = secure.raw["oauth"]
    endpoint = TokenEndpoint(
        key=Path(oauth["key"]).read_bytes(),
        kid=oauth["kid"],
        issuer=oauth["issuer"],
        audience=oauth["audience"],
    )

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode())
            status, body = endpoint.answer(self.headers.get("Authorization", ""), form)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    endpoint.url = f"http://127.0.0.1:{server.server_address[1]}/token"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()


# -- a fresh database and topics on the secured servers ------------------------------------------


def secured_stack(kafka_env: dict[str, str], postgres_env: dict[str, str]) -> Iterator[Stack]:
    """A fresh database and topics made through tm's own secured settings; ``env`` holds them
    all, so that a `tm run` of the test connects as they say."""
    env = {**kafka_env, **postgres_env}
    settings = config.load(env)
    with make_stack(settings, partitions=3) as stack:
        stack.env = {**env, **stack.env}  # the stack's own database and topics
        yield stack


# The image's fixture, for the test that runs it against the secured stack.
from tests.container.conftest import podman  # noqa: E402, F401
