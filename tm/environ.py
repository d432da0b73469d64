"""Reading one environment variable at a time, for :mod:`tm.config`: typed values, defaults for
the unset and the empty, secrets from files, and a :class:`~tm.errors.ConfigError` naming the
first bad variable. It reads only the mapping it is given; ``tm.config`` gives it the process's
environment.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from tm.errors import ConfigError

T = TypeVar("T")

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_HOST_PORT_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


class Environ:
    """Reads one variable at a time and raises ConfigError on the first bad one."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def _raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def _parse(self, name: str, default: T, parse: Callable[[str], T | None], expected: str) -> T:
        raw = self._raw(name)
        if raw is None:
            return default
        value = parse(raw)
        if value is None:
            raise ConfigError(name, raw, expected)
        return value

    def text(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def optional(self, name: str) -> str | None:
        return self._raw(name)

    def secret(self, name: str) -> str | None:
        """NAME, or the contents of the file NAME_FILE names (a mounted Kubernetes Secret), so
        that a secret need not sit in the environment. One of the two at most; a trailing
        newline of the file is not part of the secret. The value never appears in an error."""
        path = self._raw(f"{name}_FILE")
        if path is None:
            return self._raw(name)
        if self._raw(name) is not None:
            raise ConfigError(f"{name}_FILE", path, f"unset while {name} is set (one source)")
        try:
            value = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{name}_FILE", path, f"a readable file ({_why(exc)})") from None
        return value or None

    def file(self, name: str) -> str | None:
        """A path that must name a readable file (a CA, a certificate, a key), checked now so
        that a typo stops startup here rather than inside a client library."""
        path = self._raw(name)
        if path is None:
            return None
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(name, path, f"a readable file ({_why(exc)})") from None
        return path

    def integer(self, name: str, default: int, *, lo: int, hi: int) -> int:
        return self._parse(name, default, _integer_in(lo, hi), f"an integer in {lo}..{hi}")

    def optional_integer(self, name: str, *, lo: int, hi: int) -> int | None:
        """An integer in lo..hi, or None when unset or empty (a setting whose absence means
        "off", such as TM_RETENTION_DAYS)."""
        return self._parse(name, None, _integer_in(lo, hi), f"an integer in {lo}..{hi}")

    def number(self, name: str, default: float, *, lo: float, hi: float) -> float:
        def parse(raw: str) -> float | None:
            try:
                value = float(raw)
            except ValueError:
                return None
            return value if lo <= value <= hi else None

        return self._parse(name, default, parse, f"a number in {lo}..{hi}")

    def flag(self, name: str, default: bool) -> bool:
        def parse(raw: str) -> bool | None:
            low = raw.lower()
            return True if low in _TRUE else False if low in _FALSE else None

        return self._parse(name, default, parse, "one of true/false/1/0/yes/no/on/off")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        def parse(raw: str) -> str | None:
            low = raw.lower()
            return low if low in choices else None

        return self._parse(name, default, parse, "one of " + ", ".join(choices))

    def topic(self, name: str, default: str) -> str:
        def parse(raw: str) -> str | None:
            return raw if _TOPIC_RE.match(raw) and raw not in (".", "..") else None

        return self._parse(name, default, parse, "a Kafka topic name ([A-Za-z0-9._-], 1..249)")

    def brokers(self, name: str, default: str) -> tuple[str, ...]:
        def parse(raw: str) -> tuple[str, ...] | None:
            items = tuple(part.strip() for part in raw.split(",") if part.strip())
            ok = items and all(_HOST_PORT_RE.match(item) for item in items)
            return items if ok else None

        return self._parse(name, tuple(default.split(",")), parse, "a list of host:port")

    def int_list(self, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
        def parse(raw: str) -> tuple[int, ...] | None:
            try:
                items = tuple(int(part) for part in raw.split(","))
            except ValueError:
                return None
            return items if all(item > 0 for item in items) else None

        return self._parse(name, default, parse, "a comma-separated list of positive integers")

    def url(self, name: str, default: str) -> str:
        def parse(raw: str) -> str | None:
            parts = urlsplit(raw)
            ok = parts.scheme in ("http", "https") and bool(parts.netloc)
            return raw.rstrip("/") if ok else None

        return self._parse(name, default, parse, "an http(s) base URL")

    def redis_url(self, name: str) -> str | None:
        raw = self.secret(name)  # a password may be in it
        if raw is None:
            return None
        try:
            parts = urlsplit(raw)
            port_ok = parts.port is None or 0 < parts.port < 65536
            db = parts.path.strip("/")
        except ValueError:
            parts, port_ok, db = urlsplit(""), False, ""
        ok = parts.scheme in ("redis", "rediss") and bool(parts.hostname) and port_ok
        if ok and (not db or db.isdigit()):
            return raw
        shown = re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", raw)  # never print a password
        raise ConfigError(name, shown, "redis://[user:password@]host[:port][/db]")


def _integer_in(lo: int, hi: int) -> Callable[[str], int | None]:
    """A parser of an integer in lo..hi (None for anything else)."""

    def parse(raw: str) -> int | None:
        try:
            value = int(raw)
        except ValueError:
            return None
        return value if lo <= value <= hi else None

    return parse


def _why(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else type(exc).__name__
