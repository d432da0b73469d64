"""Logging on the standard ``logging`` module, in the formats of DESIGN §6.

``simple``:     ``[level:INFO,service:Task Manager,timestamp:2025-08-10T10:18:59.023Z]:message``
                followed by the record's fields as ``key=value``;
``structured``: one JSON object a line (``timestamp``, ``level``, ``service``, ``message`` and the
                fields).

Fields are passed as ``extra={"fields": {...}}``. Error lines go to stderr, the rest to stdout.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from tm.config import LogSettings

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN"}
_COLORS = {"DEBUG": "\x1b[34m", "INFO": "\x1b[33m", "WARN": "\x1b[37m", "ERROR": "\x1b[31m"}
_RESET = "\x1b[0m"


def _level_name(record: logging.LogRecord) -> str:
    return _NAMES.get(record.levelno, "ERROR" if record.levelno >= logging.ERROR else "DEBUG")


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class SimpleFormatter(logging.Formatter):
    def __init__(self, service: str, *, colors: bool) -> None:
        super().__init__()
        self._service = service
        self._colors = colors

    def format(self, record: logging.LogRecord) -> str:
        level = _level_name(record)
        shown = f"{_COLORS[level]}{level}{_RESET}" if self._colors else level
        line = f"[level:{shown},service:{self._service},timestamp:{_timestamp(record)}]:"
        line += record.getMessage()
        for key, value in _fields(record).items():
            line += f" {key}={value}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class StructuredFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "timestamp": _timestamp(record),
            "level": _level_name(record).lower(),
            "service": self._service,
            "message": record.getMessage(),
            "logger": record.name,
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def setup(settings: LogSettings) -> None:
    """Install the handlers of the configured format on the root logger (idempotent)."""
    formatter: logging.Formatter
    if settings.format == "simple":
        formatter = SimpleFormatter(settings.service_name, colors=settings.colors)
    else:
        formatter = StructuredFormatter(settings.service_name)
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_BelowError())
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.ERROR)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in (out, err):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(_LEVELS[settings.level])
