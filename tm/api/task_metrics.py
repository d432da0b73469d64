"""``/api/metrics*``: the original service's task counts, as Prometheus text and as JSON.

The names stay as the old dashboards and the OTel collector's scrape job know them
(``web_crawl_new_tasks_total`` ...), with the original's defects fixed (reference §8 items 11
and 21): one call to ``get_web_crawl_metrics(hours)`` instead of four round trips; the values are
typed ``gauge`` (they count tasks created in a sliding window that are now in a status, so they go
down too; a ``counter`` would make ``rate()`` invent resets); the content type names the text
format version; the text ends with a newline; ``hours`` is validated strictly (``6abc`` is 400,
not 6).

Requests for the same window within a few seconds share one query
(:mod:`tm.api.counts`); ``web_crawl_metrics_timestamp`` says when the counts were read.

The text also carries what the last ``tm db prune`` did (``tm_prune_*``, from the table
``tm_prune_runs``): a prune runs as a CronJob whose pod is gone before Prometheus could scrape
it, so its figures are read from the database like the counts.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime

from aiohttp import web

from tm.api.context import api_of
from tm.api.counts import Counts
from tm.api.database import PruneRun
from tm.api.responses import iso, json_error, json_response, prometheus_response
from tm.errors import DatabaseUnavailableError

log = logging.getLogger("tm.api")

MAX_HOURS = 8760  # one year: the bound METRICS_DEFAULT_TIME_RANGE_HOURS accepts
_HOURS_RE = re.compile(r"[1-9][0-9]{0,3}")
INVALID_HOURS = "Invalid hours parameter. Must be a positive number."

_FAMILIES = (
    ("web_crawl_new_tasks_total", "Web crawl tasks created in the last {h}h that are now new"),
    (
        "web_crawl_completed_tasks_total",
        "Web crawl tasks created in the last {h}h that are now completed",
    ),
    ("web_crawl_error_tasks_total", "Web crawl tasks created in the last {h}h that are now error"),
    ("web_crawl_total_tasks_count", "Web crawl tasks created in the last {h}h"),
)


def parse_hours(values: list[str], default: int) -> int | None:
    """The ``hours`` query parameter: absent is ``default``; otherwise exactly one positive
    integer of plain digits, at most :data:`MAX_HOURS`. None when invalid."""
    if not values:
        return default
    if len(values) != 1 or not _HOURS_RE.fullmatch(values[0]):
        return None
    hours = int(values[0])
    return hours if hours <= MAX_HOURS else None


def render(hours: int, counts: Counts, timestamp_s: float) -> bytes:
    """The Prometheus text (format 0.0.4) of the counts, labelled ``time_range="<hours>h"``."""
    label = f'{{time_range="{hours}h"}}'
    lines: list[str] = []
    for (name, help_text), value in zip(_FAMILIES, counts, strict=True):
        lines += [
            f"# HELP {name} {help_text.format(h=hours)}",
            f"# TYPE {name} gauge",
            f"{name}{label} {value}",
        ]
    lines += [
        "# HELP web_crawl_metrics_timestamp Unix time in seconds when these counts were read",
        "# TYPE web_crawl_metrics_timestamp gauge",
        f"web_crawl_metrics_timestamp{label} {int(timestamp_s)}",
    ]
    return ("\n".join(lines) + "\n").encode()


def render_prune(run: PruneRun | None) -> bytes:
    """The Prometheus text of the last ``tm db prune`` run: the total alone before the first."""
    total = 0 if run is None else run.deleted_rows_total
    lines = [
        "# HELP tm_prune_deleted_rows_total Finished tasks deleted by tm db prune, all runs",
        "# TYPE tm_prune_deleted_rows_total counter",
        f"tm_prune_deleted_rows_total {total}",
    ]
    if run is not None:
        for name, help_text, value in (
            (
                "tm_prune_last_run_timestamp_seconds",
                "Unix time when the last tm db prune ended",
                f"{run.finished_at_s:.3f}",
            ),
            ("tm_prune_last_deleted_rows", "Tasks the last tm db prune deleted", run.deleted_rows),
            (
                "tm_prune_last_duration_seconds",
                "How long the last tm db prune ran",
                f"{run.duration_s:.3f}",
            ),
            ("tm_prune_last_batches", "Batches of the last tm db prune", run.batches),
            (
                "tm_prune_last_complete",
                "1 when the last tm db prune reached its cutoff, 0 when it was stopped",
                int(run.is_complete),
            ),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
    return ("\n".join(lines) + "\n").encode()


async def _counts(
    request: web.Request, *, with_prune: bool = False
) -> tuple[int, float, Counts, PruneRun | None] | web.Response:
    api = api_of(request)
    hours = parse_hours(request.query.getall("hours", []), api.settings.http.metrics_default_hours)
    if hours is None:
        return json_error(400, INVALID_HOURS)
    try:
        read_at, counts = await api.counts.get(hours)
        prune = await api.counts.last_prune_run() if with_prune else None
        return hours, read_at, counts, prune
    except DatabaseUnavailableError as exc:
        # The database check logs the outage once; a scrape every 15 s must not log each time.
        log.debug("metrics unavailable", extra={"fields": {"error": str(exc)}})
        return json_error(500, "Failed to retrieve metrics")
    except Exception:
        log.exception("metrics query failed")
        return json_error(500, "Failed to retrieve metrics")


async def metrics_text(request: web.Request) -> web.Response:
    result = await _counts(request, with_prune=True)
    if isinstance(result, web.Response):
        return result
    hours, read_at, counts, prune = result
    return prometheus_response(render(hours, counts, read_at) + render_prune(prune))


async def metrics_json(request: web.Request) -> web.Response:
    result = await _counts(request)
    if isinstance(result, web.Response):
        return result
    hours, read_at, (new, completed, error, total), _ = result
    return json_response(
        {
            "newTasksCount": new,
            "completedTasksCount": completed,
            "errorTasksCount": error,
            "totalTasksCount": total,
            "timeRange": f"{hours}h",
            "timestamp": iso(datetime.now(UTC), timespec="milliseconds"),
            "lastUpdated": iso(datetime.fromtimestamp(read_at, UTC), timespec="milliseconds"),
        }
    )


async def metrics_config(request: web.Request) -> web.Response:
    http = api_of(request).settings.http
    return json_response(
        {
            "availableTimeRanges": list(http.metrics_available_hours),
            "defaultTimeRange": http.metrics_default_hours,
            "refreshInterval": http.metrics_refresh_interval_s,
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/metrics", metrics_text)
    app.router.add_get("/api/metrics/json", metrics_json)
    app.router.add_get("/api/metrics/config", metrics_config)
