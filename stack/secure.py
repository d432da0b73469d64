"""The secured local stack, beside the open one (other ports), as production clusters are:

    python stack/secure.py up|down|status     # `STACK_SECURE=1 bash stack/stack.sh up` runs `up`
    python stack/secure.py rotate             # a new server certificate, same CA, servers reload

- a local CA, and the certificates and keys of the servers and of a client, made at the first
  `up` (stack/certs.py; nothing committed), in .stack/secure/tls/;
- a second Kafka broker (KRaft, the jars of the open one) with a SASL_SSL SCRAM listener, an SSL
  listener that requires a client certificate and a SASL_SSL OAUTHBEARER listener that checks
  JWTs against a JWKS file (the signing key in .stack/secure/oauth/; the tests serve the token
  endpoint that issues them); see stack/kafka/secure.properties;
- a second PostgreSQL cluster with ``ssl=on``, ``hostssl ... scram-sha-256`` (``cert`` for the
  user ``tm_cert``, whose client certificate the stack makes) and ``hostnossl ... reject``;
- redis-server over TLS only, with a password.

Passwords are made at the first `up` and kept in .stack/secure/ (0600). `up` writes
.stack/secure/stack.json: every port, file and user, for the tests and for a person. The open
stack (stack/stack.sh) must be up first: this uses its Kafka jars and its PostgreSQL binaries.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stack import certs  # noqa: E402  (the repository root is on the path just above)

STATE = ROOT / ".stack" / "secure"
TLS = STATE / "tls"
OAUTH = STATE / "oauth"
KAFKA = STATE / "kafka"
POSTGRES = STATE / "postgres"
REDIS = STATE / "redis"
KAFKA_LIBS = ROOT / ".stack" / "kafka" / "libs"
HOST = "localhost"  # the name in the servers' certificate

PORTS = {
    "kafka_scram": int(os.environ.get("SECURE_KAFKA_SCRAM_PORT", "9192")),
    "kafka_mtls": int(os.environ.get("SECURE_KAFKA_MTLS_PORT", "9193")),
    "kafka_oauth": int(os.environ.get("SECURE_KAFKA_OAUTH_PORT", "9194")),
    "kafka_internal": int(os.environ.get("SECURE_KAFKA_INTERNAL_PORT", "9195")),
    "kafka_controller": int(os.environ.get("SECURE_KAFKA_CONTROLLER_PORT", "9196")),
    "postgres": int(os.environ.get("SECURE_POSTGRES_PORT", "5433")),
    "redis": int(os.environ.get("SECURE_REDIS_PORT", "6380")),
}
SCRAM_USER = "tm"
CERT_USER = "tm_cert"  # PostgreSQL's user of client-certificate authentication
OAUTH_KID = "tm-stack-1"
OAUTH_ISSUER = "tm-local-idp"
OAUTH_AUDIENCE = "tm-kafka"


def say(message: str) -> None:
    print(f"secure: {message}", flush=True)


def die(message: str, log: Path | None = None) -> None:
    print(f"secure: {message}", file=sys.stderr)
    if log is not None and log.exists():
        print(f"---- last 30 lines of {log} ----", file=sys.stderr)
        print("\n".join(log.read_text(errors="replace").splitlines()[-30:]), file=sys.stderr)
    sys.exit(1)


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def taken(names: tuple[str, ...]) -> None:
    """Stop with one line when another program already listens on a port this stack needs."""
    for name in names:
        if answers(PORTS[name]):
            variable = f"SECURE_{name.upper()}_PORT"
            die(f"port {PORTS[name]} is taken by another program: stop it, or set {variable}")


def secret_file(path: Path) -> str:
    """A password made once and kept (0600), so that data made with it stays usable."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(18))
    return path.read_text().strip()


def pid_alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


# -- certificates -------------------------------------------------------------------------------


def make_tls() -> None:
    """The CA, the servers' certificate and the clients', each made when missing."""
    if not (TLS / "ca.pem").exists():
        say("making a local CA and the certificates of the servers and clients (.stack/secure/tls)")
        certs.make_ca().write(TLS, "ca")
    ca = certs.Issued((TLS / "ca.pem").read_bytes(), (TLS / "ca.key").read_bytes())
    if not (TLS / "server-keystore.pem").exists():
        write_server_certificate(ca)
    if not (TLS / "client.pem").exists():
        certs.issue(ca, "tm", client=True).write(TLS, "client")
    if not (TLS / "postgres-client.pem").exists():
        certs.issue(ca, CERT_USER, client=True).write(TLS, "postgres-client")
    if not (OAUTH / "jwks.json").exists():
        OAUTH.mkdir(parents=True, exist_ok=True)
        key = OAUTH / "jwt.key"
        key.touch(mode=0o600)
        key.write_bytes(certs.make_jwt_key())
        (OAUTH / "jwks.json").write_text(certs.jwks(key.read_bytes(), OAUTH_KID))


def write_server_certificate(ca: certs.Issued) -> bytes:
    """A new certificate of the servers, signed by ``ca``, in .stack/secure/tls; returns it."""
    server = certs.issue(ca, HOST, hosts=(HOST,))
    server.write(TLS, "server")
    keystore = TLS / "server-keystore.pem"  # Kafka's PEM key store: the key, then the chain
    keystore.touch(mode=0o600)
    keystore.write_bytes(server.key + server.cert + ca.cert)
    return server.cert


def rotate() -> None:
    """A new server certificate from the same CA, as an operator rotates one: PostgreSQL
    reloads it (new connections get it), the broker restarts with it, Redis too."""
    ca = certs.Issued((TLS / "ca.pem").read_bytes(), (TLS / "ca.key").read_bytes())
    write_server_certificate(ca)
    data = POSTGRES / "data"
    for name in ("server.pem", "server.key"):
        shutil.copy(TLS / name, data / name)
        if os.geteuid() == 0:
            shutil.chown(data / name, "postgres", "postgres")
    as_postgres([str(pg_bin() / "pg_ctl"), "-D", str(data), "reload"], POSTGRES / "pg_ctl.log")
    stop_pid(KAFKA / "kafka.pid", "kafka")
    kafka_up()
    stop_pid(REDIS / "redis.pid", "redis")
    redis_up()
    say("rotated the servers' certificate (same CA)")


# -- Kafka --------------------------------------------------------------------------------------


def kafka_java(*args: str, log: Path) -> list[str]:
    return [
        "java", "-Xms128m", "-Xmx512m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={ROOT / 'stack/kafka/log4j2.properties'}",
        f"-Dkafka.logs.dir={KAFKA / 'logs'}", f"-Dstack.log.file={log.name}",
        f"-Dorg.apache.kafka.sasl.oauthbearer.allowed.urls={(OAUTH / 'jwks.json').as_uri()}",
        "-cp", f"{KAFKA_LIBS}/*", *args,
    ]  # fmt: skip


def kafka_props() -> Path:
    text = (ROOT / "stack/kafka/secure.properties").read_text()
    values = {
        "SCRAM_PORT": PORTS["kafka_scram"],
        "MTLS_PORT": PORTS["kafka_mtls"],
        "OAUTH_PORT": PORTS["kafka_oauth"],
        "INTERNAL_PORT": PORTS["kafka_internal"],
        "CONTROLLER_PORT": PORTS["kafka_controller"],
        "KEYSTORE": TLS / "server-keystore.pem",
        "CA": TLS / "ca.pem",
        "JWKS_URL": (OAUTH / "jwks.json").as_uri(),
        "ISSUER": OAUTH_ISSUER,
        "AUDIENCE": OAUTH_AUDIENCE,
        "DATA_DIR": KAFKA / "data",
    }
    for name, value in values.items():
        text = text.replace(f"@{name}@", str(value))
    props = KAFKA / "server.properties"
    props.write_text(text)
    return props


def kafka_up() -> None:
    if pid_alive(KAFKA / "kafka.pid") and answers(PORTS["kafka_scram"]):
        say(f"kafka: already running at {HOST}:{PORTS['kafka_scram']}")
        return
    taken(("kafka_scram", "kafka_mtls", "kafka_oauth", "kafka_internal", "kafka_controller"))
    if not any(KAFKA_LIBS.glob("kafka-clients-*.jar")):
        die("kafka: no jars in .stack/kafka/libs: run `bash stack/stack.sh up` first")
    (KAFKA / "logs").mkdir(parents=True, exist_ok=True)
    password = secret_file(KAFKA / "scram-password")
    props = kafka_props()
    if not (KAFKA / "data" / "meta.properties").exists():
        log = KAFKA / "logs" / "format.log"
        scram = [f"SCRAM-SHA-{bits}=[name={SCRAM_USER},password={password}]" for bits in (256, 512)]
        command = kafka_java(
            "kafka.tools.StorageTool", "format", "-t", "tm-secure-stack-0001", "-c", str(props),
            "--add-scram", scram[0], "--add-scram", scram[1], log=log,
        )  # fmt: skip
        with log.open("w") as output:
            if subprocess.run(command, stdout=output, stderr=output, check=False).returncode:
                die("kafka: format storage failed", log)
        say(f"kafka: formatted storage with SCRAM user {SCRAM_USER}")
    out, pid_file = KAFKA / "logs" / "kafka.out", KAFKA / "kafka.pid"
    pid_file.unlink(missing_ok=True)
    # A session of its own (setsid -f), detached from whoever runs this: the broker outlives
    # the call, and the pid file holds the JVM's pid (the shell execs it).
    java = kafka_java("kafka.Kafka", str(props), log=KAFKA / "logs" / "server.log")
    with out.open("w") as stream:
        subprocess.run(
            ["setsid", "-f", "bash", "-c", 'echo $$ > "$1"; shift; exec "$@"', "_",
             str(pid_file), *java],
            stdout=stream, stderr=stream, stdin=subprocess.DEVNULL, check=True,
        )  # fmt: skip
    deadline = time.monotonic() + 90
    while not pid_file.exists() or not pid_file.read_text().strip():
        if time.monotonic() > deadline:
            die("kafka: the secured broker did not start", out)
        time.sleep(0.1)
    say(f"kafka: starting the secured broker (pid {pid_file.read_text().strip()})")
    while not all(answers(PORTS[p]) for p in ("kafka_scram", "kafka_mtls", "kafka_oauth")):
        if pid_alive(pid_file) is None:
            die("kafka: the secured broker exited during start-up", KAFKA / "logs" / "server.log")
        if time.monotonic() > deadline:
            die("kafka: the secured broker did not listen within 90 s", out)
        time.sleep(0.5)
    kafka_wait_scram(password)
    say(f"kafka: ready: SCRAM :{PORTS['kafka_scram']}, mTLS :{PORTS['kafka_mtls']}, "
        f"OAUTHBEARER :{PORTS['kafka_oauth']}")  # fmt: skip


def kafka_wait_scram(password: str) -> None:
    """A metadata request over the SCRAM listener: TLS, the user and the broker all work."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(
        {
            "bootstrap.servers": f"{HOST}:{PORTS['kafka_scram']}",
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-256",
            "sasl.username": SCRAM_USER,
            "sasl.password": password,
            "ssl.ca.location": str(TLS / "ca.pem"),
            "log_level": 0,
        }
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if admin.list_topics(timeout=5).brokers:
                return
        except Exception as exc:
            if time.monotonic() > deadline:
                die(f"kafka: no answer over SCRAM: {exc}", KAFKA / "logs" / "server.log")
        time.sleep(1)


def stop_pid(pid_file: Path, what: str) -> None:
    pid = pid_alive(pid_file)
    if pid is None:
        say(f"{what}: not running")
        return
    os.kill(pid, signal.SIGTERM)
    for _ in range(300):
        if pid_alive(pid_file) is None:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    say(f"{what}: stopped (pid {pid})")


# -- PostgreSQL ---------------------------------------------------------------------------------


def pg_bin() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if not found:
        die("postgres: no PostgreSQL binaries: run `bash stack/stack.sh up` first")
    return Path(found[-1]).parent


def as_postgres(command: list[str], log: Path) -> None:
    """Run a PostgreSQL program as the postgres user (when root); its output goes to ``log``."""
    what = Path(command[0]).name
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    with log.open("a") as out:
        if subprocess.run(command, stdout=out, stderr=out, check=False).returncode:
            die(f"postgres: {what} failed", log)


def pg_up() -> None:
    data, run, log = POSTGRES / "data", POSTGRES / "run", POSTGRES / "server.log"
    if answers(PORTS["postgres"]) and pid_alive(data / "postmaster.pid"):
        say(f"postgres: already running at {HOST}:{PORTS['postgres']}")
        return
    taken(("postgres",))
    password = secret_file(POSTGRES / "password")
    bin_dir = pg_bin()
    run.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(POSTGRES, "postgres", "postgres")
        shutil.chown(run, "postgres", "postgres")
        for parent in (STATE, STATE.parent):
            parent.chmod(parent.stat().st_mode | 0o001)  # traversable by postgres
    if not (data / "PG_VERSION").exists():
        say("postgres: initdb .stack/secure/postgres/data")
        pwfile = POSTGRES / "initdb-password"
        pwfile.write_text(password)
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        as_postgres(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
             "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256",
             f"--pwfile={pwfile}"],
            POSTGRES / "initdb.log",
        )  # fmt: skip
        pwfile.unlink()
        for name in ("server.pem", "server.key", "ca.pem"):
            target = data / name
            shutil.copy(TLS / name, target)
            target.chmod(0o600)
            if os.geteuid() == 0:
                shutil.chown(target, "postgres", "postgres")
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\n# ---- tm secured local stack (stack/secure.py) ----\n"
                f"listen_addresses = '127.0.0.1'\nport = {PORTS['postgres']}\n"
                f"unix_socket_directories = '{run}'\nmax_connections = 100\n"
                "ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\n"
                "ssl_ca_file = 'ca.pem'\npassword_encryption = 'scram-sha-256'\n"
            )
    (data / "pg_hba.conf").write_text(
        "# tm secured local stack: over TCP only TLS, with SCRAM or a client certificate\n"
        "local     all all                   trust\n"
        f"hostssl   all {CERT_USER} 127.0.0.1/32 cert\n"
        "hostssl   all all           127.0.0.1/32 scram-sha-256\n"
        "hostnossl all all           127.0.0.1/32 reject\n"
    )
    as_postgres(
        [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start"],
        POSTGRES / "pg_ctl.log",
    )
    # The user of client-certificate authentication: the CN of tls/postgres-client.pem.
    as_postgres(
        [str(bin_dir / "psql"), "-X", "-q",
         "-h", str(run), "-p", str(PORTS["postgres"]), "-U", "postgres", "-d", "postgres",
         "-c", f"DO $$ BEGIN CREATE ROLE {CERT_USER} LOGIN SUPERUSER; "
               "EXCEPTION WHEN duplicate_object THEN NULL; END $$"],
        POSTGRES / "pg_ctl.log",
    )  # fmt: skip
    say(f"postgres: ready at {HOST}:{PORTS['postgres']} (hostssl scram-sha-256, hostnossl reject)")


def pg_down() -> None:
    data = POSTGRES / "data"
    if not pid_alive(data / "postmaster.pid"):
        say("postgres: not running")
        return
    as_postgres([str(pg_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                POSTGRES / "pg_ctl.log")  # fmt: skip
    say("postgres: stopped")


# -- Redis --------------------------------------------------------------------------------------


def redis_up() -> None:
    pid_file = REDIS / "redis.pid"
    if pid_alive(pid_file) and answers(PORTS["redis"]):
        say(f"redis: already running at {HOST}:{PORTS['redis']} (TLS)")
        return
    taken(("redis",))
    if shutil.which("redis-server") is None:
        die("redis: redis-server missing: run `STACK_REDIS=1 bash stack/stack.sh up` first")
    REDIS.mkdir(parents=True, exist_ok=True)
    password = secret_file(REDIS / "password")
    conf = REDIS / "redis.conf"
    conf.touch(mode=0o600)
    conf.write_text(
        f"port 0\ntls-port {PORTS['redis']}\nbind 127.0.0.1\n"
        f"tls-cert-file {TLS / 'server.pem'}\ntls-key-file {TLS / 'server.key'}\n"
        f"tls-ca-cert-file {TLS / 'ca.pem'}\ntls-auth-clients no\n"
        f'requirepass {password}\nsave ""\nappendonly no\ndaemonize yes\n'
        f"pidfile {pid_file}\nlogfile {REDIS / 'redis.log'}\ndir {REDIS}\n"
    )
    done = subprocess.run(["redis-server", str(conf)], capture_output=True, text=True, check=False)
    if done.returncode:
        die(f"redis: start failed: {done.stderr.strip()}", REDIS / "redis.log")
    deadline = time.monotonic() + 20
    while not answers(PORTS["redis"]):
        if time.monotonic() > deadline:
            die("redis: no TLS port within 20 s", REDIS / "redis.log")
        time.sleep(0.2)
    say(f"redis: ready at rediss://{HOST}:{PORTS['redis']} (password in .stack/secure/redis)")


# -- the whole --------------------------------------------------------------------------------


def describe() -> dict[str, object]:
    return {
        "host": HOST,
        "ports": PORTS,
        "tls": {name: str(TLS / name) for name in (
            "ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key",
            "postgres-client.pem", "postgres-client.key")},
        "kafka": {"scram_user": SCRAM_USER, "scram_password_file": str(KAFKA / "scram-password"),
                  "pid_file": str(KAFKA / "kafka.pid")},
        "oauth": {"key": str(OAUTH / "jwt.key"), "kid": OAUTH_KID, "issuer": OAUTH_ISSUER,
                  "audience": OAUTH_AUDIENCE},
        "postgres": {"user": "postgres", "password_file": str(POSTGRES / "password"),
                     "cert_user": CERT_USER,
                     "data": str(POSTGRES / "data")},
        "redis": {"password_file": str(REDIS / "password")},
    }  # fmt: skip


def up() -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    make_tls()
    kafka_up()
    pg_up()
    redis_up()
    (STATE / "stack.json").write_text(json.dumps(describe(), indent=2) + "\n")


def down() -> None:
    stop_pid(KAFKA / "kafka.pid", "kafka")
    pg_down()
    stop_pid(REDIS / "redis.pid", "redis")


def status() -> int:
    rows = {
        "kafka": pid_alive(KAFKA / "kafka.pid") and answers(PORTS["kafka_scram"]),
        "postgres": answers(PORTS["postgres"]),
        "redis": answers(PORTS["redis"]),
    }
    for name, ok in rows.items():
        print(f"secure {name}: {'running' if ok else 'not running'}")
    return 0 if all(rows.values()) else 1


if __name__ == "__main__":
    verb = sys.argv[1] if len(sys.argv) > 1 else ""
    if verb == "up":
        up()
    elif verb == "down":
        down()
    elif verb == "status":
        sys.exit(status())
    elif verb == "rotate":
        rotate()
    else:
        die("usage: python stack/secure.py up|down|status|rotate")
