"""A PostgreSQL server and a Kafka broker of the chaos test's own, so that it can crash them
(``pg_ctl -m immediate``, ``kill -9`` of the broker) without touching the shared local stack the
other tests use. They come from what `make stack-up` installed: Debian's PostgreSQL binaries and
the Kafka jars in ``.stack/kafka/libs``.

The broker has two listeners: ``DIRECT`` for the test's own clients (the gateway and the crawlers,
which the faults leave alone) and ``PROXIED``, advertised at a TCP proxy's port, for tm: a
client that bootstraps through the proxy is handed the proxy's address for every later
connection, so a proxy fault reaches all of tm's Kafka traffic.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from harness import answers, free_port

REPO = Path(__file__).resolve().parents[2]
KAFKA_LIBS = REPO / ".stack" / "kafka" / "libs"
KAFKA_LOG4J = REPO / "stack" / "kafka" / "log4j2.properties"
START_TIMEOUT_S = 60.0


def _wait_port(port: int, *, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not answers("127.0.0.1", port):
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(
                f"{what} did not listen on :{port} in {START_TIMEOUT_S:.0f} s\n{tail}"
            )
        time.sleep(0.2)


class Postgres:
    """A throw-away PostgreSQL cluster on a free port (trust authentication: test only)."""

    def __init__(self, root: Path) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not bins:
            raise RuntimeError("PostgreSQL binaries missing: run `make stack-up`")
        self._bin = Path(bins[-1]).parent
        self.port = free_port()
        self._root = root
        self._data = root / "data"
        self._log = root / "postgres.log"
        self._as_postgres = os.geteuid() == 0  # root may not run postgres: its own user does
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(root, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self._data),
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--auth=trust",
        )
        with (self._data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{root}'\nmax_connections = 100\n"
                "fsync = off\nsynchronous_commit = on\nshared_buffers = 128MB\n"
            )

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self._bin / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self._data), "-l", str(self._log), "-w", "-t", "60", "start")
        _wait_port(self.port, what="PostgreSQL", log=self._log)

    def crash(self) -> None:
        """What a power cut does: no checkpoint, no goodbye to the clients."""
        self._run("pg_ctl", "-D", str(self._data), "-m", "immediate", "stop")

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._run("pg_ctl", "-D", str(self._data), "-m", "fast", "-w", "stop")


class Kafka:
    """A single KRaft broker+controller on free ports, in its own directory."""

    def __init__(self, root: Path, *, proxied_listener_port: int, proxied_port: int) -> None:
        """``proxied_listener_port``: where the PROXIED listener listens (the proxy's target);
        ``proxied_port``: the proxy's own port, which that listener advertises."""
        if not any(KAFKA_LIBS.glob("kafka-clients-*.jar")):
            # The shared broker may be one this checkout did not start (another clone's, or an
            # external one): fetch the jars (Maven, cached in ~/.m2).
            done = subprocess.run(
                ["bash", str(REPO / "stack" / "stack.sh"), "kafka-libs"],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if done.returncode != 0 or not any(KAFKA_LIBS.glob("kafka-clients-*.jar")):
                raise RuntimeError(f"Kafka jars missing in .stack/kafka/libs: {done.stderr}")
        self.port = free_port()  # DIRECT: the test's own clients
        self.proxied_listener_port = proxied_listener_port
        self._controller_port = free_port()
        self._root = root
        self._log = root / "kafka.out"
        self._props = root / "server.properties"
        self._props.write_text(
            "process.roles=broker,controller\nnode.id=1\n"
            f"controller.quorum.voters=1@127.0.0.1:{self._controller_port}\n"
            f"listeners=DIRECT://127.0.0.1:{self.port},"
            f"PROXIED://127.0.0.1:{self.proxied_listener_port},"
            f"CONTROLLER://127.0.0.1:{self._controller_port}\n"
            f"advertised.listeners=DIRECT://127.0.0.1:{self.port},"
            f"PROXIED://127.0.0.1:{proxied_port}\n"
            "controller.listener.names=CONTROLLER\n"
            "listener.security.protocol.map=DIRECT:PLAINTEXT,PROXIED:PLAINTEXT,"
            "CONTROLLER:PLAINTEXT\n"
            "inter.broker.listener.name=DIRECT\n"
            f"log.dirs={root / 'data'}\n"
            "offsets.topic.replication.factor=1\noffsets.topic.num.partitions=4\n"
            "transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n"
            "share.coordinator.state.topic.replication.factor=1\n"
            "share.coordinator.state.topic.min.isr=1\n"
            "group.initial.rebalance.delay.ms=1000\n"
            "auto.create.topics.enable=false\nnum.partitions=1\ndefault.replication.factor=1\n"
            "min.insync.replicas=1\nnum.network.threads=2\nnum.io.threads=2\n"
        )
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        done = subprocess.run(
            [
                *self._java(),
                "kafka.tools.StorageTool",
                "format",
                f"--cluster-id={cluster_id}",  # with "=": an id may begin with "-"
                "-c",
                str(self._props),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"kafka storage format failed: {done.stdout}{done.stderr}")
        self._process: subprocess.Popen[bytes] | None = None

    def _java(self) -> list[str]:
        return [
            "java",
            "-Xms128m",
            "-Xmx512m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
            f"-Dkafka.logs.dir={self._root}",
            "-cp",
            f"{KAFKA_LIBS}/*",
        ]

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with self._log.open("ab") as out:
            self._process = subprocess.Popen(
                [*self._java(), "kafka.Kafka", str(self._props)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_port(self.port, what="Kafka", log=self._log)

    def kill(self) -> None:
        """kill -9 of the broker: no controlled shutdown, open connections reset."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(30)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def scratch_dir(prefix: str) -> Path:
    """A directory the postgres user can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
