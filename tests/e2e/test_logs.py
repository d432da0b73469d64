"""Logging as a real process writes it: each format's exact stdout/stderr, the LOG_DIR files and
their rotation under four concurrent processes, e-mail masking, trace ids, and OTLP log records
arriving at a receiver. No Kafka or PostgreSQL: each test runs a small ``python -c`` script that
loads the settings from its environment and calls ``logs.setup`` as ``tm`` does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.otlp_receiver import OtlpReceiver, otlp_receiver
from tm.observability import logfiles, logs

ROOT = Path(__file__).resolve().parents[2]
TS = "2025-08-10T10:18:59.023Z"
ESC = "\x1b"

# Every record gets the same creation time, so lines compare exactly. setup() runs twice: the
# second call must change nothing (one line per record, not two).
PRELUDE = """
import logging, os, sys
from datetime import UTC, datetime
from tm import config
from tm.observability import logs

_factory = logging.getLogRecordFactory()
_created = datetime(2025, 8, 10, 10, 18, 59, 23000, tzinfo=UTC).timestamp()

def _fixed(*args, **kwargs):
    record = _factory(*args, **kwargs)
    record.created = _created
    return record

logging.setLogRecordFactory(_fixed)
settings = config.load()
logs.setup(settings.log, settings.otel, environment=settings.environment)
logs.setup(settings.log, settings.otel, environment=settings.environment)
log = logging.getLogger("tm.test")
"""

TRACER = """
from opentelemetry.sdk.trace import TracerProvider
tracer = TracerProvider(shutdown_on_exit=False).get_tracer("test")

def ids(span):
    context = span.get_span_context()
    return f"{context.trace_id:032x}/{context.span_id:016x}"
"""

FOUR_LEVELS = """
log.debug("cache warm")
log.info("task stored", extra={"fields": {"task_id": "t-1", "count": 3}})
log.warning("slow batch", extra={"fields": {"ms": 12.5}})
log.error("database unavailable", extra={"fields": {"sqlstate": "08006"}})
"""


def code(*parts: str) -> str:
    """Join script parts, each dedented on its own."""
    return "\n".join(textwrap.dedent(part) for part in parts)


def _env(extra: dict[str, str]) -> dict[str, str]:
    ours = ("LOG_", "OTEL_", "TRACING_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.pop("SERVICE_NAME", None)
    env.pop("NODE_ENV", None)
    return {**env, **extra}


def spawn(body: str, env: dict[str, str], **kwargs: Any) -> subprocess.Popen[str]:
    script = PRELUDE + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", script], env=_env(env), cwd=ROOT, text=True, **kwargs
    )


def run(body: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    script = PRELUDE + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=_env(env or {}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


def parse(text: str) -> list[dict[str, Any]]:
    """Every line is exactly one JSON object."""
    return [json.loads(line) for line in text.splitlines()]


# -- simple ------------------------------------------------------------------------------------


@pytest.mark.parametrize("colors", [None, "false", "0", "no"])
def test_simple_format_without_colours_prints_exact_lines_errors_to_stderr(
    colors: str | None,
) -> None:
    env = {} if colors is None else {"LOG_COLORS": colors}
    done = run(FOUR_LEVELS, env)
    head = f"service:Task Manager,timestamp:{TS}]:"
    assert done.stdout.splitlines() == [
        f"[level:INFO,{head}task stored task_id=t-1 count=3",
        f"[level:WARN,{head}slow batch ms=12.5",
    ]
    assert done.stderr.splitlines() == [f"[level:ERROR,{head}database unavailable sqlstate=08006"]


def test_simple_colours_the_level_word_only_when_on() -> None:
    done = run(FOUR_LEVELS, {"LOG_COLORS": "true", "LOG_LEVEL": "debug", "SERVICE_NAME": "tm-x"})
    head = f",service:tm-x,timestamp:{TS}]:"
    assert done.stdout.splitlines() == [
        f"[level:{ESC}[34mDEBUG{ESC}[0m{head}cache warm",
        f"[level:{ESC}[33mINFO{ESC}[0m{head}task stored task_id=t-1 count=3",
        f"[level:{ESC}[37mWARN{ESC}[0m{head}slow batch ms=12.5",
    ]
    assert done.stderr.splitlines() == [
        f"[level:{ESC}[31mERROR{ESC}[0m{head}database unavailable sqlstate=08006"
    ]


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("debug", ["cache warm", "task stored", "slow batch", "database unavailable"]),
        ("info", ["task stored", "slow batch", "database unavailable"]),
        ("warn", ["slow batch", "database unavailable"]),
        ("error", ["database unavailable"]),
    ],
)
def test_log_level_shows_only_records_at_or_above_it(level: str, shown: list[str]) -> None:
    done = run(FOUR_LEVELS, {"LOG_FORMAT": "structured", "LOG_LEVEL": level})
    records = parse(done.stdout) + parse(done.stderr)
    assert [r["message"] for r in records] == shown


# -- structured ----------------------------------------------------------------------------------


def _base(level: str, message: str) -> dict[str, Any]:
    return {
        "timestamp": TS,
        "level": level,
        "service": "Task Manager",
        "message": message,
        "trace_id": "",
        "span_id": "",
        "logger": "tm.test",
    }


@pytest.mark.parametrize("colors", [None, "false"])
def test_structured_is_one_json_object_a_line(colors: str | None) -> None:
    env = {"LOG_FORMAT": "structured", "LOG_LEVEL": "debug"}
    if colors is not None:
        env["LOG_COLORS"] = colors
    done = run(
        code(
            FOUR_LEVELS,
            """
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("apply failed", extra={"fields": {"batch": 7}})
        log.info("odd fields", extra={"fields": {"level": "x", "tags": ["a", 1], "obj": object}})
        """,
        ),
        env,
    )
    assert ESC not in done.stdout + done.stderr
    out, err = parse(done.stdout), parse(done.stderr)
    assert out == [
        _base("debug", "cache warm"),
        {**_base("info", "task stored"), "task_id": "t-1", "count": 3},
        {**_base("warn", "slow batch"), "ms": 12.5},
        {
            **_base("info", "odd fields"),
            "field_level": "x",
            "tags": ["a", 1],
            "obj": "<class 'object'>",
        },
    ]
    assert err[0] == {**_base("error", "database unavailable"), "sqlstate": "08006"}
    exception = err[1].pop("exception")
    assert err[1] == {**_base("error", "apply failed"), "batch": 7}
    assert exception.startswith("Traceback (most recent call last):\n")
    assert exception.endswith("ZeroDivisionError: division by zero")
    assert len(err) == 2


def test_structured_puts_a_level_circle_in_front_only_with_colours() -> None:
    done = run(FOUR_LEVELS, {"LOG_FORMAT": "structured", "LOG_LEVEL": "debug", "LOG_COLORS": "1"})
    lines = done.stdout.splitlines() + done.stderr.splitlines()
    assert [line[:2] for line in lines] == ["🔵 ", "🟡 ", "⚪ ", "🔴 "]
    assert [json.loads(line[2:])["level"] for line in lines] == ["debug", "info", "warn", "error"]
    assert ESC not in done.stdout + done.stderr


# -- masking -------------------------------------------------------------------------------------

PII = """
log.info("mail to alice.smith@example.com", extra={"fields": {
    "owner": "bob@corp.example.org", "cc": ["carol@x.io", 3], "n": 1, "plain": "no at sign"}})
try:
    raise ValueError("duplicate key dave@example.net")
except ValueError:
    log.exception("rejected")
"""


@pytest.mark.parametrize("pii", [None, "false", "off"])
def test_emails_are_masked_unless_pii_is_on(pii: str | None) -> None:
    env = {"LOG_FORMAT": "structured"} | ({} if pii is None else {"LOG_PII": pii})
    done = run(PII, env)
    (info,) = parse(done.stdout)
    (error,) = parse(done.stderr)
    assert info["message"] == "mail to a***@example.com"
    assert info["owner"] == "b***@corp.example.org"
    assert info["cc"] == ["c***@x.io", 3]
    assert (info["n"], info["plain"]) == (1, "no at sign")
    assert "ValueError: duplicate key d***@example.net" in error["exception"]
    assert "alice" not in done.stdout + done.stderr
    assert "dave@" not in done.stdout + done.stderr


def test_emails_are_shown_with_pii_on() -> None:
    done = run(PII, {"LOG_FORMAT": "structured", "LOG_PII": "true"})
    (info,) = parse(done.stdout)
    (error,) = parse(done.stderr)
    assert info["message"] == "mail to alice.smith@example.com"
    assert (info["owner"], info["cc"]) == ("bob@corp.example.org", ["carol@x.io", 3])
    assert "duplicate key dave@example.net" in error["exception"]


def test_simple_format_masks_emails_too() -> None:
    done = run(PII, {})
    assert done.stdout.splitlines() == [
        f"[level:INFO,service:Task Manager,timestamp:{TS}]:mail to a***@example.com"
        " owner=b***@corp.example.org cc=['c***@x.io', 3] n=1 plain=no at sign"
    ]


# -- trace ids -----------------------------------------------------------------------------------

SPANS = code(
    TRACER,
    """
log.info("before")
with tracer.start_as_current_span("batch") as batch:
    log.info("in batch", extra={"fields": {"expect": ids(batch)}})
    with tracer.start_as_current_span("message") as message:
        log.error("in message", extra={"fields": {"expect": ids(message)}})
log.info("after")
""",
)


def test_structured_lines_inside_a_span_carry_its_ids() -> None:
    done = run(SPANS, {"LOG_FORMAT": "structured"})
    records = parse(done.stdout) + parse(done.stderr)
    by_message = {r["message"]: r for r in records}
    assert set(by_message) == {"before", "in batch", "in message", "after"}
    for name in ("before", "after"):
        assert (by_message[name]["trace_id"], by_message[name]["span_id"]) == ("", "")
    for name in ("in batch", "in message"):
        record = by_message[name]
        assert f"{record['trace_id']}/{record['span_id']}" == record["expect"]
        assert len(record["trace_id"]) == 32 and len(record["span_id"]) == 16
    assert by_message["in batch"]["trace_id"] == by_message["in message"]["trace_id"]


def test_simple_lines_inside_a_span_carry_its_ids() -> None:
    done = run(SPANS, {})
    lines = done.stdout.splitlines() + done.stderr.splitlines()
    assert [line.split("]:")[1] for line in lines if "trace_id" not in line] == ["before", "after"]
    for line in lines:
        if "expect=" in line:
            expect = line.split("expect=")[1].split()[0]
            trace_id, span_id = expect.split("/")
            assert line.endswith(f" trace_id={trace_id} span_id={span_id}")


# -- files ---------------------------------------------------------------------------------------


def test_log_dir_holds_an_error_file_and_a_combined_file(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    done = run(FOUR_LEVELS, {"LOG_DIR": str(directory), "LOG_COLORS": "true"})
    assert f"{ESC}[33mINFO" in done.stdout  # the console keeps its format and colours ...
    combined = (directory / logs.COMBINED_FILE).read_text()
    error = (directory / logs.ERROR_FILE).read_text()
    assert ESC not in combined + error  # ... the files never have colours
    assert [r["message"] for r in parse(combined)] == [
        "task stored",
        "slow batch",
        "database unavailable",
    ]
    assert parse(error) == [{**_base("error", "database unavailable"), "sqlstate": "08006"}]


WRITER = """
from tm.observability import logfiles
logfiles.MAX_FILE_BYTES = int(os.environ["MAX_FILE_BYTES"])
proc = int(os.environ["PROC"])
sys.stderr.write("ready\\n")
sys.stderr.flush()
sys.stdin.readline()
for seq in range(int(os.environ["LINES"])):
    log.info("line", extra={"fields": {"proc": proc, "seq": seq, "pad": "x" * (seq % 150)}})
"""


def test_rotation_under_four_processes_loses_and_repeats_nothing(tmp_path: Path) -> None:
    # 4 x 1000 lines of about 260 B: 4 rotations, all kept (1 + BACKUP_COUNT files)
    max_bytes, lines, procs = 256 * 1024, 1000, 4
    base = {"LOG_DIR": str(tmp_path), "MAX_FILE_BYTES": str(max_bytes), "LINES": str(lines)}
    writers = [
        spawn(
            WRITER,
            {**base, "PROC": str(proc)},
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for proc in range(procs)
    ]
    try:
        for writer in writers:  # all four imported and set up: now let them write at once
            assert writer.stderr is not None
            assert writer.stderr.readline() == "ready\n"
        for writer in writers:
            assert writer.stdin is not None
            writer.stdin.write("go\n")
            writer.stdin.close()
        for writer in writers:
            assert writer.wait(timeout=60) == 0
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
            assert writer.stderr is not None
            writer.stderr.close()

    path = tmp_path / logs.COMBINED_FILE
    rotated = [Path(f"{path}.{n}") for n in range(logfiles.BACKUP_COUNT, 0, -1)]
    files = [p for p in rotated if p.exists()] + [path]  # oldest first
    assert len(files) >= 4, "expected several rotations"
    assert not Path(f"{path}.{logfiles.BACKUP_COUNT + 1}").exists()
    seen: list[tuple[int, int]] = []
    for file in files:
        data = file.read_bytes()
        assert len(data) <= max_bytes
        assert data.endswith(b"\n")
        seen.extend((r["proc"], r["seq"]) for r in parse(data.decode()))  # no torn lines
    assert len(seen) == len(set(seen)) == procs * lines  # none lost, none duplicated
    for proc in range(procs):  # and each process's lines in the order it wrote them
        assert [seq for p, seq in seen if p == proc] == list(range(lines))
    assert (tmp_path / logs.ERROR_FILE).read_bytes() == b""


# -- otel ----------------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as running:
        yield running


def _otel_env(endpoint: str, **extra: str) -> dict[str, str]:
    return {
        "LOG_FORMAT": "otel",
        "LOG_LEVEL": "debug",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": "tm-logs-test",
        "OTEL_SERVICE_VERSION": "9.9.9",
        "NODE_ENV": "test",
        **extra,
    }


def test_otel_exports_batched_records_with_hex_ids_and_right_severities(
    receiver: OtlpReceiver,
) -> None:
    done = run(
        code(
            TRACER,
            FOUR_LEVELS,
            """
        with tracer.start_as_current_span("batch") as span:
            log.info("in span owner@example.com", extra={"fields": {
                "expect": ids(span), "count": 3, "ratio": 0.5, "ok": True, "ids": [1, 2]}})
        """,
        ),
        _otel_env(receiver.endpoint),
    )
    console = parse(done.stdout) + parse(done.stderr)  # the console shows JSON lines
    assert len(console) == 5
    received = receiver.wait_for(lambda got: len(got) >= 5)
    assert receiver.requests == 1  # one batch, not one POST per line
    by_body = {r.body: r for r in received}
    expected = {
        "cache warm": (5, "DEBUG"),
        "task stored": (9, "INFO"),
        "slow batch": (13, "WARN"),
        "database unavailable": (17, "ERROR"),
        "in span o***@example.com": (9, "INFO"),
    }
    assert {body: (r.severity_number, r.severity_text) for body, r in by_body.items()} == expected
    for record in received:
        assert record.resource["service.name"] == "tm-logs-test"
        assert record.resource["service.version"] == "9.9.9"
        assert record.resource["deployment.environment"] == "test"
        assert record.time_unix_nano == 1754821139023000000
    spanned = by_body["in span o***@example.com"]
    assert f"{spanned.trace_id}/{spanned.span_id}" == spanned.attributes["expect"]
    assert len(spanned.trace_id) == 32
    assert spanned.attributes["count"] == 3
    assert spanned.attributes["ratio"] == 0.5
    assert spanned.attributes["ok"] is True
    assert spanned.attributes["ids"] == "[1,2]"
    assert by_body["task stored"].attributes == {
        "task_id": "t-1",
        "count": 3,
        "logger.name": "tm.test",
    }
    assert (by_body["task stored"].trace_id, by_body["task stored"].span_id) == ("", "")


def test_otel_in_a_forked_child_exports_each_record_once(
    receiver: OtlpReceiver, tmp_path: Path
) -> None:
    # The parent's "before fork" is still queued when it forks (the batch delay is 5 s): the
    # child must neither send it again nor send its own records through the parent's pipeline.
    run(
        """
        log.info("before fork")
        pid = os.fork()
        if pid == 0:
            logs.setup(settings.log, settings.otel, environment=settings.environment)
            log.info("in child", extra={"fields": {"pid": os.getpid()}})
            logs.shutdown()
            os._exit(0)
        os.waitpid(pid, 0)
        log.info("after fork", extra={"fields": {"pid": os.getpid()}})
        """,
        _otel_env(receiver.endpoint, LOG_DIR=str(tmp_path)),
    )
    received = receiver.wait_for(lambda got: len(got) >= 3)
    assert sorted(r.body for r in received) == ["after fork", "before fork", "in child"]
    by_body = {r.body: r for r in received}
    parent, child = by_body["after fork"], by_body["in child"]
    assert parent.resource["process.pid"] == parent.attributes["pid"]
    assert by_body["before fork"].resource["process.pid"] == parent.attributes["pid"]
    assert child.resource["process.pid"] == child.attributes["pid"] != parent.attributes["pid"]
    combined = parse((tmp_path / logs.COMBINED_FILE).read_text())
    assert [r["message"] for r in combined] == ["before fork", "in child", "after fork"]


def test_a_dead_collector_costs_records_not_time() -> None:
    # A listener that never accepts: connections hang in its backlog, as with a stuck collector.
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        endpoint = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
        started = time.monotonic()
        done = run(
            """
            import time
            begin = time.perf_counter()
            for n in range(2000):
                log.info("tick", extra={"fields": {"n": n}})
            print(f"elapsed {time.perf_counter() - begin}", file=sys.stderr)
            """,
            _otel_env(endpoint, TRACING_DELAY_MS="10", TRACING_MAX_BATCH_SIZE="100"),
        )
        took_s = time.monotonic() - started
    elapsed_s = float(done.stderr.split("elapsed ")[1].split()[0])
    assert len(parse(done.stdout)) == 2000
    # Logging never waited for the collector, and exit waited at most SHUTDOWN_TIMEOUT_S for it
    # (an export alone would wait EXPORT_TIMEOUT_S; the SDK's own shutdown up to 30 s).
    assert elapsed_s < logs.EXPORT_TIMEOUT_S
    assert took_s < logs.SHUTDOWN_TIMEOUT_S + 2.5 < logs.EXPORT_TIMEOUT_S


def test_otel_format_off_sends_nothing(receiver: OtlpReceiver) -> None:
    env = _otel_env(receiver.endpoint, LOG_FORMAT="structured")
    done = run(FOUR_LEVELS, env)
    assert len(parse(done.stdout)) == 3
    assert receiver.requests == 0 and receiver.logs == []
