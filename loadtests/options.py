"""The knobs of the load test (``LOAD_*`` environment variables) and the names of what it
reports. Pure: no locust, no gevent, so that the driver (``python -m loadtests``) and the tests
import it without monkey-patching their process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

# The stages of a task, as locust request events (type STAGE_TYPE): their names sort in order.
STAGE_TYPE = "stage"
STAGE_REQUEST = "1 gateway new -> crawl request read"
STAGE_VISIBLE = "2 crawler update -> state in /api/tasks/{id}"
STAGES = (STAGE_REQUEST, STAGE_VISIBLE)
# A crawl request tm sent again (a redelivered `new`): counted, never answered twice.
REPEATED_REQUEST = "crawl request repeated (not answered again)"

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True, slots=True)
class LoadOptions:
    user_rate: float  # LOAD_USER_RATE: `new` tasks a second per gateway user
    error_share: float  # LOAD_ERROR_SHARE: share of crawl requests answered with `error`
    stage_timeout_s: float  # LOAD_STAGE_TIMEOUT_S: a stage not done by then is a failure
    poll_s: float  # LOAD_POLL_MS: how often a task's row is looked at after its update
    drain_s: float  # LOAD_DRAIN_S: after the users stop, how long tasks in flight may finish
    max_tasks: int  # LOAD_MAX_TASKS: no more `new` tasks than this per test run
    max_seconds: float  # LOAD_MAX_SECONDS: no new task after this long (the web UI has no -t)
    http_users: int  # LOAD_HTTP_USERS: API users (fixed count, besides the gateway users)
    http_rate: float  # LOAD_HTTP_RATE: requests a second per API user

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> LoadOptions:
        source = os.environ if env is None else env

        def number(name: str, default: float, lo: float, hi: float) -> float:
            raw = source.get(name, "")
            value = float(raw) if raw.strip() else default
            if not lo <= value <= hi:
                raise ValueError(f"{name}={raw!r}: expected a number in {lo}..{hi}")
            return value

        return cls(
            user_rate=number("LOAD_USER_RATE", 10.0, 0.01, 10_000),
            error_share=number("LOAD_ERROR_SHARE", 0.2, 0.0, 1.0),
            stage_timeout_s=number("LOAD_STAGE_TIMEOUT_S", 30.0, 1.0, 3600),
            poll_s=number("LOAD_POLL_MS", 25.0, 1.0, 10_000) / 1000,
            drain_s=number("LOAD_DRAIN_S", 20.0, 0.0, 600),
            max_tasks=int(number("LOAD_MAX_TASKS", 1_000_000, 1, 100_000_000)),
            max_seconds=number("LOAD_MAX_SECONDS", 3600.0, 1.0, 86_400),
            http_users=int(number("LOAD_HTTP_USERS", 2, 0, 100)),
            http_rate=number("LOAD_HTTP_RATE", 5.0, 0.01, 1000),
        )


def is_local(host_or_url: str) -> bool:
    """True for 127.0.0.1, localhost or ::1, given as a host, host:port or URL."""
    text = host_or_url if "//" in host_or_url else f"//{host_or_url}"
    try:
        host = urlsplit(text).hostname
    except ValueError:
        return False
    return host in LOCAL_HOSTS


def refuse_non_local(*, host: str, brokers: tuple[str, ...]) -> str | None:
    """Why the load test will not run against these addresses, or None: its traffic goes to
    this machine only."""
    if not is_local(host):
        return f"the API host {host!r} is not on this machine (127.0.0.1)"
    far = [b for b in brokers if not is_local(b)]
    if far:
        return f"KAFKA_BROKERS {','.join(far)!r} is not on this machine (127.0.0.1)"
    return None
