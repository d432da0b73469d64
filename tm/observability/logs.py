"""Logging on the standard ``logging`` module, in the formats of DESIGN §6.

``simple``:     ``[level:INFO,service:Task Manager,timestamp:2025-08-10T10:18:59.023Z]:message``
                followed by the record's fields as `` key=value``;
``structured``: one JSON object a line: ``timestamp``, ``level``, ``service``, ``message``,
                ``trace_id``, ``span_id``, ``logger`` and the fields (an error's traceback as the
                ``exception`` field);
``otel``:       the structured lines on the console, and every record of a worker or of the API
                process (not the supervisor's, see below) exported over OTLP/HTTP to
                ``<OTEL_EXPORTER_OTLP_ENDPOINT>/v1/logs`` by a batching processor whose thread does
                the I/O: the caller only appends to a bounded queue, so a dead collector loses
                records, never time.

Fields are passed as ``extra={"fields": {...}}``. Errors go to stderr, the rest to stdout. Each
record is turned once into a :class:`_View` (level, masked message and fields, trace and span id of
the current span) that every handler reuses. With ``LOG_DIR`` two more handlers append structured
lines to ``task-manager-error.log`` and ``task-manager-combined.log``; many processes share them
(see :mod:`tm.observability.logfiles`).

:func:`setup` runs in the supervisor with ``export=False``: its console and files, but no OTLP
exporter, thread or connection, since nothing with a socket or thread may cross a fork. Each
forked child runs it again and builds its own exporter; the handlers it inherited are closed
(their file descriptors too: each process takes the files' ``flock`` through its own).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import socket
import sys
import threading
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
from opentelemetry import trace
from opentelemetry._logs import SeverityNumber
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, get_value
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource

from tm.config import LogSettings, OtelSettings
from tm.observability.logfiles import SharedFileHandler

EXPORT_TIMEOUT_S = 5.0  # one OTLP export, retries included (the original's v1 logger used 5 s)
SHUTDOWN_TIMEOUT_S = 2.0  # flushing queued records at exit; past it they are lost, not waited for
ERROR_FILE = "task-manager-error.log"
COMBINED_FILE = "task-manager-combined.log"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
_COLORS = {"DEBUG": "\x1b[34m", "INFO": "\x1b[33m", "WARN": "\x1b[37m", "ERROR": "\x1b[31m"}
_RESET = "\x1b[0m"
_CIRCLES = {"DEBUG": "🔵", "INFO": "🟡", "WARN": "⚪", "ERROR": "🔴"}
_SEVERITY = {
    "DEBUG": SeverityNumber.DEBUG,  # 5 (the original sent 7)
    "INFO": SeverityNumber.INFO,  # 9
    "WARN": SeverityNumber.WARN,  # 13
    "ERROR": SeverityNumber.ERROR,  # 17
}
# local part (its first character kept) @ domain with at least one dot
_EMAIL_RE = re.compile(r"([A-Za-z0-9_%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)")
_CORE_KEYS = frozenset({"timestamp", "level", "service", "message", "trace_id", "span_id"})


def mask_emails(text: str) -> str:
    """``alice@example.com`` -> ``a***@example.com``; strings without an '@' are not scanned."""
    return _EMAIL_RE.sub(r"\1***@\2", text) if "@" in text else text


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        return mask_emails(value)
    if isinstance(value, list | tuple):
        return [_mask(item) for item in value]
    if isinstance(value, dict):
        return {key: _mask(item) for key, item in value.items()}
    return value


class _View(NamedTuple):
    """What every handler needs from one record, computed once (in the logging thread)."""

    level: str
    timestamp: str
    message: str
    fields: dict[str, Any]
    trace_id: str
    span_id: str
    exception: str | None


class _State:
    pii = False
    handlers: tuple[logging.Handler, ...] = ()
    provider: LoggerProvider | None = None


_state = _State()


def _level_name(levelno: int) -> str:
    if levelno >= logging.ERROR:
        return "ERROR"
    if levelno >= logging.WARNING:
        return "WARN"
    return "INFO" if levelno >= logging.INFO else "DEBUG"


def _view(record: logging.LogRecord) -> _View:
    cached = record.__dict__.get("_tm_view")
    if isinstance(cached, _View):
        return cached
    moment = datetime.fromtimestamp(record.created, UTC)
    fields = getattr(record, "fields", None)
    fields = dict(fields) if isinstance(fields, dict) else {}
    message = record.getMessage()
    exception = None
    if record.exc_info:
        exception = logging.Formatter().formatException(record.exc_info)
    elif record.exc_text:
        exception = record.exc_text
    if not _state.pii:
        message = mask_emails(message)
        fields = {key: _mask(value) for key, value in fields.items()}
        exception = exception and mask_emails(exception)
    span = trace.get_current_span().get_span_context()
    view = _View(
        level=_level_name(record.levelno),
        timestamp=moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        message=message,
        fields=fields,
        trace_id=format(span.trace_id, "032x") if span.is_valid else "",
        span_id=format(span.span_id, "016x") if span.is_valid else "",
        exception=exception,
    )
    record.__dict__["_tm_view"] = view
    return view


class SimpleFormatter(logging.Formatter):
    def __init__(self, service: str, *, colors: bool) -> None:
        super().__init__()
        self._service = service
        self._colors = colors

    def format(self, record: logging.LogRecord) -> str:
        view = _view(record)
        level = f"{_COLORS[view.level]}{view.level}{_RESET}" if self._colors else view.level
        parts = [f"[level:{level},service:{self._service},timestamp:{view.timestamp}]:"]
        parts.append(view.message)
        parts.extend(f" {key}={value}" for key, value in view.fields.items())
        if view.trace_id:
            parts.append(f" trace_id={view.trace_id} span_id={view.span_id}")
        if view.exception:
            parts.append("\n" + view.exception)
        return "".join(parts)


class StructuredFormatter(logging.Formatter):
    """One JSON object; with colours, a level circle and a space in front of it."""

    def __init__(self, service: str, *, colors: bool = False) -> None:
        super().__init__()
        self._service = service
        self._colors = colors

    def format(self, record: logging.LogRecord) -> str:
        view = _view(record)
        doc: dict[str, Any] = {
            "timestamp": view.timestamp,
            "level": view.level.lower(),
            "service": self._service,
            "message": view.message,
            "trace_id": view.trace_id,
            "span_id": view.span_id,
            "logger": record.name,
        }
        for key, value in view.fields.items():
            doc[f"field_{key}" if key in _CORE_KEYS else key] = value
        if view.exception:
            doc["exception"] = view.exception
        line = orjson.dumps(doc, default=str).decode()
        return f"{_CIRCLES[view.level]} {line}" if self._colors else line


class OtelHandler(logging.Handler):
    """Turns records into OTel log records; the processor batches and exports them."""

    def __init__(self, provider: LoggerProvider) -> None:
        super().__init__()
        self._logger = provider.get_logger("tm")
        self._closed = False

    def close(self) -> None:
        self._closed = True
        super().close()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("opentelemetry", "urllib3")):
            return  # the exporter talking about itself
        if self._closed or get_value(_SUPPRESS_INSTRUMENTATION_KEY):
            return  # logged from inside an export, or after shutdown()
        try:
            view = _view(record)
            attributes = {key: _attribute(value) for key, value in view.fields.items()}
            attributes["logger.name"] = record.name
            if view.exception:
                attributes["exception.stacktrace"] = view.exception
            self._logger.emit(
                timestamp=round(record.created * 1e6) * 1000,  # float seconds: keep the µs
                severity_number=_SEVERITY[view.level],
                severity_text=view.level,
                body=view.message,
                attributes=attributes,
            )
        except Exception:
            self.handleError(record)


def _attribute(value: Any) -> str | bool | int | float:
    if isinstance(value, str | bool | int | float):
        return value
    return orjson.dumps(value, default=str).decode()


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def _provider(otel: OtelSettings, environment: str) -> LoggerProvider:
    # Imported here: a process that never exports (the supervisor) does not load the exporter
    # and its HTTP client.
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter

    resource = Resource.create(
        {
            "service.name": otel.service_name,
            "service.version": otel.service_version,
            "deployment.environment": environment,
            "host.name": socket.gethostname(),
            "process.pid": os.getpid(),
        }
    )
    exporter = OTLPLogExporter(
        endpoint=f"{otel.exporter_endpoint}/v1/logs", timeout=EXPORT_TIMEOUT_S
    )
    provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_log_record_processor(
        BatchLogRecordProcessor(
            exporter,
            schedule_delay_millis=otel.delay_ms,
            max_export_batch_size=min(otel.max_batch_size, otel.max_queue_size),
            max_queue_size=otel.max_queue_size,
        )
    )
    return provider


def setup(
    settings: LogSettings,
    otel: OtelSettings | None = None,
    *,
    environment: str = "development",
    export: bool = True,
) -> None:
    """Install the handlers of the configured format on the root logger, in place of those an
    earlier call installed (in this process or in the parent it was forked from).

    ``otel`` is needed for ``LOG_FORMAT=otel`` (its endpoint, service name and version). With
    ``export=False`` that format writes its console lines but builds no OTLP exporter: call it so
    in a process that will fork (the supervisor), and let each child build its own."""
    if settings.format == "otel" and otel is None:
        raise ValueError("LOG_FORMAT=otel needs the OtelSettings")
    _release()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    colors = settings.colors
    console: logging.Formatter
    if settings.format == "simple":
        console = SimpleFormatter(settings.service_name, colors=colors)
    else:
        console = StructuredFormatter(settings.service_name, colors=colors)
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_BelowError())
    out.setFormatter(console)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.ERROR)
    err.setFormatter(console)
    handlers: list[logging.Handler] = [out, err]
    if settings.directory:
        os.makedirs(settings.directory, exist_ok=True)
        plain = StructuredFormatter(settings.service_name)
        for name, level in ((ERROR_FILE, logging.ERROR), (COMBINED_FILE, logging.NOTSET)):
            shared = SharedFileHandler(os.path.join(settings.directory, name), level=level)
            shared.setFormatter(plain)
            handlers.append(shared)
    if export and otel is not None and settings.format == "otel":
        _state.provider = _provider(otel, environment)
        handlers.append(OtelHandler(_state.provider))
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(_LEVELS[settings.level])
    # The OTLP exporter's HTTP client would log two debug lines per export, about itself.
    logging.getLogger("urllib3").setLevel(max(_LEVELS[settings.level], logging.INFO))
    _state.pii = settings.pii
    _state.handlers = tuple(handlers)


def _release() -> None:
    """Take down what the last setup() built, here or in the parent this process was forked from
    (the supervisor never builds an exporter, so a child inherits no OTLP pipeline)."""
    provider, _state.provider = _state.provider, None
    for handler in _state.handlers:
        logging.getLogger().removeHandler(handler)
        if isinstance(handler, SharedFileHandler):
            # Close its descriptors even if the parent opened them (close() keeps those).
            handler.acquire()
            try:
                handler.abandon()
            finally:
                handler.release()
        handler.close()
    _state.handlers = ()
    if provider is not None:
        _shutdown_provider(provider, SHUTDOWN_TIMEOUT_S)


def _shutdown_provider(provider: LoggerProvider, timeout_s: float) -> None:
    # The SDK's shutdown waits up to 30 s for a collector; a daemon thread bounds the wait.
    try:
        closer = threading.Thread(target=provider.shutdown, name="tm-log-shutdown", daemon=True)
        closer.start()
    except RuntimeError:  # interpreter finalizing: no new threads; the queue is lost
        return
    closer.join(timeout_s)


def shutdown(timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Flush and close this process's handlers (OTLP export bounded by ``timeout_s``).

    Call it before ``os._exit``, which skips atexit; a normal exit calls it itself."""
    provider, _state.provider = _state.provider, None
    for handler in _state.handlers:
        if isinstance(handler, OtelHandler):
            handler.close()
        else:
            handler.flush()
    if provider is not None:
        _shutdown_provider(provider, timeout_s)


atexit.register(shutdown)
