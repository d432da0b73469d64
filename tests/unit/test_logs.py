"""The pieces of tm.observability.logs in-process: masking, the two line formats, the shared
file handler's rotation (tm.observability.logfiles), and the OTel handler's severities and ids.
No test here calls ``setup()`` in pytest's process, where it would replace pytest's own handlers
on the root logger: one runs it in a child interpreter (what it builds, with and without the
exporter), and tests/e2e/test_logs.py checks what real processes write with it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.trace import TracerProvider

from tm.observability import logfiles, logs

CREATED = 1754821139.023  # 2025-08-10T10:18:59.023Z
TRACER = TracerProvider(shutdown_on_exit=False).get_tracer("test")


def record(
    message: str = "hello",
    *,
    level: int = logging.INFO,
    fields: dict[str, Any] | None = None,
    exc_info: Any = None,
    name: str = "tm.test",
) -> logging.LogRecord:
    made = logging.LogRecord(name, level, __file__, 1, message, None, exc_info)
    made.created = CREATED
    if fields is not None:
        made.fields = fields
    return made


@pytest.fixture(autouse=True)
def _masking_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs._state, "pii", False)


# -- masking -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("alice@example.com", "a***@example.com"),
        ("to: bob.smith+tag@mail.example.co.uk, ok", "to: b***@mail.example.co.uk, ok"),
        ("a@b.io and c@d.io", "a***@b.io and c***@d.io"),
        ("no address here", "no address here"),
        ("user@localhost", "user@localhost"),  # no domain with a dot: not an e-mail address
        ("@example.com", "@example.com"),
    ],
)
def test_mask_emails(text: str, masked: str) -> None:
    assert logs.mask_emails(text) == masked


def test_masking_reaches_nested_field_values_and_leaves_other_types() -> None:
    view = logs._view(record(fields={"who": ["x@y.io", {"cc": "z@y.io"}], "n": 3, "ok": True}))
    assert view.fields == {"who": ["x***@y.io", {"cc": "z***@y.io"}], "n": 3, "ok": True}


def test_pii_on_keeps_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs._state, "pii", True)
    view = logs._view(record("mail x@y.io", fields={"who": "x@y.io"}))
    assert (view.message, view.fields) == ("mail x@y.io", {"who": "x@y.io"})


# -- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "name"),
    [
        (logging.DEBUG, "DEBUG"),
        (5, "DEBUG"),
        (logging.INFO, "INFO"),
        (25, "INFO"),
        (logging.WARNING, "WARN"),
        (logging.ERROR, "ERROR"),
        (logging.CRITICAL, "ERROR"),
    ],
)
def test_levels_map_to_the_four_names(level: int, name: str) -> None:
    assert logs._view(record(level=level)).level == name


def test_simple_line() -> None:
    formatter = logs.SimpleFormatter("Task Manager", colors=False)
    line = formatter.format(record("stored", fields={"task_id": "t-1", "n": 2}))
    head = "[level:INFO,service:Task Manager,timestamp:2025-08-10T10:18:59.023Z]:"
    assert line == head + "stored task_id=t-1 n=2"


def test_simple_line_with_colours_and_a_traceback() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        made = record("failed", level=logging.ERROR, exc_info=sys.exc_info())
    line = logs.SimpleFormatter("S", colors=True).format(made)
    first, *rest = line.split("\n")
    assert (
        first == "[level:\x1b[31mERROR\x1b[0m,service:S,timestamp:2025-08-10T10:18:59.023Z]:failed"
    )
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "RuntimeError: boom"


def test_structured_line_keeps_core_keys_and_renames_clashing_fields() -> None:
    made = record("m", fields={"message": "clash", "level": 1, "count": 2, "at": object()})
    doc = json.loads(logs.StructuredFormatter("S").format(made))
    assert doc == {
        "timestamp": "2025-08-10T10:18:59.023Z",
        "level": "info",
        "service": "S",
        "message": "m",
        "trace_id": "",
        "span_id": "",
        "logger": "tm.test",
        "field_message": "clash",
        "field_level": 1,
        "count": 2,
        "at": doc["at"],
    }
    assert doc["at"].startswith("<object object at")


def test_structured_circle_only_with_colours() -> None:
    made = record(level=logging.WARNING)
    assert logs.StructuredFormatter("S", colors=True).format(made).startswith("⚪ {")
    assert logs.StructuredFormatter("S").format(made).startswith("{")


def test_ids_of_the_current_span() -> None:
    assert logs._view(record()).trace_id == ""
    with TRACER.start_as_current_span("batch") as span:
        view = logs._view(record())
    context = span.get_span_context()
    assert view.trace_id == f"{context.trace_id:032x}"
    assert view.span_id == f"{context.span_id:016x}"


def test_the_view_is_computed_once_per_record() -> None:
    made = record("a@b.io")
    assert logs._view(made) is logs._view(made)


# -- shared file handler -------------------------------------------------------------------------


@pytest.fixture
def small_files(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(logfiles, "MAX_FILE_BYTES", 100)
    return 100


@pytest.fixture
def handler(tmp_path: Path) -> Iterator[logfiles.SharedFileHandler]:
    shared = logfiles.SharedFileHandler(str(tmp_path / "x.log"))
    yield shared
    shared.close()


def test_files_rotate_by_size_and_keep_backup_count(
    tmp_path: Path, handler: logfiles.SharedFileHandler, small_files: int
) -> None:
    lines = [f"{n:03d}".encode() + b"-" * 35 + b"\n" for n in range(30)]  # 40 B: 2 per file
    for line in lines:
        handler.write(line)
    names = sorted(p.name for p in tmp_path.iterdir())
    expected = [f"x.log.{n}" for n in range(1, logfiles.BACKUP_COUNT + 1)]
    assert names == sorted(["x.log", "x.log.lock", *expected])
    kept = b"".join(
        (tmp_path / name).read_bytes()
        for name in [f"x.log.{n}" for n in range(logfiles.BACKUP_COUNT, 0, -1)] + ["x.log"]
    )
    assert kept == b"".join(lines[-2 * (logfiles.BACKUP_COUNT + 1) :])


def test_a_line_longer_than_the_limit_still_goes_in_whole(
    tmp_path: Path, handler: logfiles.SharedFileHandler, small_files: int
) -> None:
    handler.write(b"short\n")
    handler.write(b"y" * 300 + b"\n")
    assert (tmp_path / "x.log.1").read_bytes() == b"short\n"
    assert (tmp_path / "x.log").read_bytes() == b"y" * 300 + b"\n"


def test_the_writer_follows_a_rotation_done_elsewhere(
    tmp_path: Path, handler: logfiles.SharedFileHandler
) -> None:
    handler.write(b"one\n")
    (tmp_path / "x.log").rename(tmp_path / "x.log.1")  # as another process would
    handler.write(b"two\n")
    (tmp_path / "x.log").unlink()  # or an operator
    handler.write(b"three\n")
    assert (tmp_path / "x.log.1").read_bytes() == b"one\n"
    assert (tmp_path / "x.log").read_bytes() == b"three\n"


def test_the_handler_writes_structured_lines(
    tmp_path: Path, handler: logfiles.SharedFileHandler
) -> None:
    handler.setFormatter(logs.StructuredFormatter("S"))
    handler.handle(record("first"))
    handler.handle(record("second\nline"))
    lines = (tmp_path / "x.log").read_text().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["first", "second\nline"]


# -- otel ----------------------------------------------------------------------------------------


@pytest.fixture
def exported() -> Iterator[tuple[logs.OtelHandler, InMemoryLogRecordExporter]]:
    exporter = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    provider = LoggerProvider(shutdown_on_exit=False)
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    yield logs.OtelHandler(provider), exporter
    provider.shutdown()


def test_otel_severity_numbers_and_ids(
    exported: tuple[logs.OtelHandler, InMemoryLogRecordExporter],
) -> None:
    handler, exporter = exported
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
        handler.handle(record(level=level))
    with TRACER.start_as_current_span("s") as span:
        handler.handle(record("traced", fields={"n": 1, "ratio": 0.5, "ids": [1]}))
    got = [r.log_record for r in exporter.get_finished_logs()]
    assert [r.severity_number.value for r in got if r.severity_number] == [5, 9, 13, 17, 9]
    assert [r.severity_text for r in got] == ["DEBUG", "INFO", "WARN", "ERROR", "INFO"]
    assert got[-1].trace_id == span.get_span_context().trace_id
    assert got[-1].span_id == span.get_span_context().span_id
    assert got[0].trace_id == 0
    assert dict(got[-1].attributes or {}) == {
        "n": 1,
        "ratio": 0.5,
        "ids": "[1]",
        "logger.name": "tm.test",
    }


def test_otel_skips_the_exporters_own_records_and_closed_handlers(
    exported: tuple[logs.OtelHandler, InMemoryLogRecordExporter],
) -> None:
    handler, exporter = exported
    handler.handle(record(name="opentelemetry.exporter.otlp"))
    handler.handle(record(name="urllib3.connectionpool"))
    handler.close()
    handler.handle(record())
    assert exporter.get_finished_logs() == ()


# -- setup ---------------------------------------------------------------------------------------

SETUP = """
import sys, threading
from tm import config
from tm.observability import logs

settings = config.load({"LOG_FORMAT": "otel", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})

def otlp():
    threads = [t.name for t in threading.enumerate() if t.name.startswith("OtelBatch")]
    exporter = "opentelemetry.exporter.otlp.proto.http._log_exporter" in sys.modules
    return logs._state.provider is not None, exporter, len(threads)

logs.setup(settings.log, settings.otel, environment="test", export=False)
print(otlp(), len(logs.logging.getLogger().handlers))
logs.setup(settings.log, settings.otel, environment="test")
logs.setup(settings.log, settings.otel, environment="test")
print(otlp(), len(logs.logging.getLogger().handlers))
"""


def test_the_supervisors_setup_builds_no_exporter_and_a_second_call_replaces_the_first() -> None:
    """export=False (before a fork): no provider, no exporter module, no thread; the children's
    setup() builds one, and calling it again leaves one set of handlers and one thread."""
    done = subprocess.run(
        [sys.executable, "-c", SETUP], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["(False, False, 0) 2", "(True, True, 1) 3"]
