"""``tm watch [TASK_ID]``: follow the task-event feed (REDIS_URL) and print each transition as it
happens, one line each: ``<at> <task_id> <status> [trace_id=<id>]``. Without a task id it reads
the stream from now on (``XREAD BLOCK``); with one, it subscribes to that task's channel: what a
gateway's WebSocket handler would do for its users. It runs until interrupted, or until ``limit``
events were printed.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tm.adapters.redis_readers import follow
from tm.config import Settings
from tm.errors import ConfigError


def _line(fields: dict[str, str]) -> str:
    line = f"{fields.get('at', '-')} {fields.get('task_id', '-')} {fields.get('status', '-')}"
    if fields.get("trace_id"):
        line += f" trace_id={fields['trace_id']}"
    return line


def watch(
    settings: Settings, task_id: str | None, *, limit: int | None = None, out: TextIO = sys.stdout
) -> int:
    """Print transitions until interrupted (or ``limit`` of them); returns the exit status."""
    if settings.redis.url is None:
        raise ConfigError("REDIS_URL", "", "a redis:// URL: tm watch reads the task-event feed")
    if limit == 0:
        return 0
    for printed, fields in enumerate(follow(settings.redis, task_id), start=1):
        print(_line(fields), file=out, flush=True)
        if printed == limit:
            break
    return 0
