"""tm's Grafana dashboard, as code: every panel and its queries are built here with the Grafana
Foundation SDK and written to ``k8s/components/monitoring/tm-dashboard.json``.

    python -m stack.dashboard            # write the JSON (commit it with this file)
    python -m stack.dashboard --check    # exit 1 if the committed JSON is not what this builds
    python -m stack.dashboard png --prometheus http://127.0.0.1:9090 --out docs/img/dashboard.png

The PNG draws the main panels from a Prometheus that scraped a run (its ``query_range``), with
matplotlib, for readers who have no Grafana at hand. Every query selects
``namespace=~"$namespace", instance=~"$instance"``; rates use ``$__rate_interval``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dashboard_builder
from grafana_foundation_sdk.builders import prometheus, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, dashboard
from grafana_foundation_sdk.models import prometheus as prometheus_model

OUT = (
    Path(__file__).resolve().parents[1] / "k8s" / "components" / "monitoring" / "tm-dashboard.json"
)
UID = "tm-overview"
SEL = 'namespace=~"$namespace", instance=~"$instance"'
DATASOURCE = dashboard.DataSourceRef(type_val="prometheus", uid="${datasource}")


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"  # or "table"
    width: int = 12


def rate(metric: str, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{SEL}}}[$__rate_interval]))"


def increase(metric: str, by: str) -> str:
    return f"sum by ({by}) (increase({metric}{{{SEL}}}[$__rate_interval]))"


def quantile(q: float, histogram: str, by: str = "") -> str:
    grouping = f"{by}, le" if by else "le"
    return (
        f"histogram_quantile({q}, sum by ({grouping}) "
        f"(rate({histogram}_bucket{{{SEL}}}[$__rate_interval])))"
    )


ROWS: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = (
    (
        "Throughput",
        (
            PanelSpec(
                "Messages applied by outcome",
                "Messages applied in PostgreSQL per second, by outcome.",
                "ops",
                (Query(rate("tm_messages_applied_total", "outcome"), "{{outcome}}"),),
            ),
            PanelSpec(
                "Dead letters by reason",
                "Messages sent to the dead-letter topic per second, by reason.",
                "ops",
                (Query(rate("tm_dead_letters_total", "reason"), "{{reason}}"),),
            ),
        ),
    ),
    (
        "Lag",
        (
            PanelSpec(
                "Lag per partition (messages)",
                "High watermark minus the group's committed offset, per partition.",
                "short",
                (
                    Query(
                        f"max by (partition) (tm_consumer_lag_messages{{{SEL}}})", "{{partition}}"
                    ),
                ),
            ),
            PanelSpec(
                "Lag per partition (seconds)",
                "Time to consume the lag at the partition's current commit rate (a partition "
                "that does not move shows a very large value).",
                "s",
                (
                    Query(
                        f"max by (partition) (tm_consumer_lag_messages{{{SEL}}}) / clamp_min("
                        f"max by (partition) (rate(tm_consumer_committed_offset{{{SEL}}}"
                        "[$__rate_interval])), 0.001)",
                        "{{partition}}",
                    ),
                ),
            ),
        ),
    ),
    (
        "Latency",
        (
            PanelSpec(
                "End-to-end latency",
                "From a message's Kafka timestamp to the commit of its batch.",
                "s",
                (
                    Query(quantile(0.5, "tm_end_to_end_latency_seconds"), "p50"),
                    Query(quantile(0.99, "tm_end_to_end_latency_seconds"), "p99"),
                ),
            ),
            PanelSpec(
                "Stage durations",
                "Time per batch in each stage: decode, db, publish, commit (at-least-once), "
                "transaction (exactly-once).",
                "s",
                (
                    Query(quantile(0.5, "tm_stage_duration_seconds", "stage"), "{{stage}} p50"),
                    Query(quantile(0.99, "tm_stage_duration_seconds", "stage"), "{{stage}} p99"),
                ),
            ),
            PanelSpec(
                "Batch size",
                "Messages per committed batch.",
                "short",
                (
                    Query(quantile(0.5, "tm_batch_size_messages"), "p50"),
                    Query(quantile(0.99, "tm_batch_size_messages"), "p99"),
                ),
            ),
            PanelSpec(
                "Retries and transactions",
                "Batches retried after a transient failure; exactly-once, Kafka transactions "
                "by outcome and cause.",
                "ops",
                (
                    Query(rate("tm_batch_retries_total"), "batch retries"),
                    Query(rate("tm_transactions_total", "outcome, cause"), "{{outcome}} {{cause}}"),
                ),
            ),
        ),
    ),
    (
        "Workers",
        (
            PanelSpec(
                "Workers",
                "Worker processes configured, alive, and joined to the consumer group.",
                "short",
                (
                    Query(f"sum(tm_workers_configured{{{SEL}}})", "configured"),
                    Query(f"sum(tm_workers_running{{{SEL}}})", "running"),
                    Query(f"sum(tm_workers_assigned{{{SEL}}})", "assigned"),
                ),
                width=8,
            ),
            PanelSpec(
                "Rebalances and restarts",
                "Partition assignment changes seen by the workers, and processes the "
                "supervisor restarted.",
                "short",
                (
                    Query(increase("tm_rebalances_total", "kind"), "{{kind}}"),
                    Query(increase("tm_worker_restarts_total", "role"), "{{role}} restarted"),
                ),
                width=8,
            ),
            PanelSpec(
                "Database pool",
                "Connections of the workers' pools, by state.",
                "short",
                (Query(f"sum by (state) (tm_db_pool_connections{{{SEL}}})", "{{state}}"),),
                width=8,
            ),
            PanelSpec(
                "Memory per process",
                "Resident memory of each tm process (its pid label is the reporting process: "
                "the API process reports the supervisor's).",
                "bytes",
                (
                    Query(
                        f"max by (instance, role, pid) (tm_process_resident_memory_bytes{{{SEL}}})",
                        "{{role}} {{pid}}",
                    ),
                ),
            ),
            PanelSpec(
                "Task-event feed",
                "Task transitions for the Redis feed: sent, or dropped (Redis slow or down).",
                "ops",
                (Query(rate("tm_task_events_total", "outcome"), "{{outcome}}"),),
            ),
        ),
    ),
    (
        "Tasks and alerts",
        (
            PanelSpec(
                "Tasks by status",
                "Tasks created in the configured window (METRICS_DEFAULT_TIME_RANGE_HOURS), by "
                "their status now (GET /api/metrics).",
                "short",
                (
                    Query(f"max(web_crawl_new_tasks_total{{{SEL}}})", "new"),
                    Query(f"max(web_crawl_completed_tasks_total{{{SEL}}})", "completed"),
                    Query(f"max(web_crawl_error_tasks_total{{{SEL}}})", "error"),
                ),
            ),
            PanelSpec(
                "Alerts firing",
                "tm's alerts (k8s/prometheus/tm-alerts.yaml) firing now.",
                "short",
                (Query(f'ALERTS{{alertstate="firing", {SEL}}}', "{{alertname}}"),),
                kind="table",
            ),
        ),
    ),
)


def _target(query: Query, ref: str) -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .expr(query.expr)
        .legend_format(query.legend)
        .ref_id(ref)
        .datasource(DATASOURCE)
    )


def _panel(spec: PanelSpec) -> Any:
    panel: Any
    if spec.kind == "table":
        panel = table.Panel()
    else:
        panel = (
            timeseries.Panel()
            .fill_opacity(10)
            .legend(
                common_builder.VizLegendOptions()
                .display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM)
                .show_legend(True)
            )
        )
    panel = (
        panel.title(spec.title)
        .description(spec.description)
        .unit(spec.unit)
        .datasource(DATASOURCE)
        .height(8)
        .span(spec.width)
    )
    for i, query in enumerate(spec.queries):
        target = _target(query, chr(ord("A") + i))
        if spec.kind == "table":
            target = target.instant().format(prometheus_model.PromQueryFormat.TABLE)
        panel = panel.with_target(target)
    return panel


def _variables() -> list[Any]:
    source = (
        dashboard_builder.DatasourceVariable("datasource").label("Data source").type("prometheus")
    )

    def label_values(name: str, label: str, query: str) -> Any:
        return (
            dashboard_builder.QueryVariable(name)
            .label(label)
            .datasource(DATASOURCE)
            .query(query)
            .refresh(dashboard.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .include_all(True)
            .all_value(".*")
            .multi(True)
            .current(dashboard.VariableOption(text="All", value="$__all"))
        )

    return [
        source,
        label_values("namespace", "Namespace", "label_values(tm_workers_configured, namespace)"),
        label_values(
            "instance",
            "Instance",
            'label_values(tm_workers_configured{namespace=~"$namespace"}, instance)',
        ),
    ]


def build() -> dict[str, Any]:
    """The dashboard's JSON model."""
    builder = (
        dashboard_builder.Dashboard("tm")
        .uid(UID)
        .description("tm, the task manager: throughput, lag, latency, workers, tasks, alerts.")
        .tags(["tm", "kafka", "postgresql"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(dashboard.DashboardCursorSync.CROSSHAIR)
    )
    for variable in _variables():
        builder = builder.with_variable(variable)
    for title, panels in ROWS:
        builder = builder.with_row(dashboard_builder.Row(title))
        for spec in panels:
            builder = builder.with_panel(_panel(spec))
    model: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    return model


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def queries(model: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (panel title, PromQL expression) of a dashboard model."""
    return [
        (panel["title"], target["expr"])
        for panel in model["panels"]
        for target in panel.get("targets", [])
    ]


# -- the picture -------------------------------------------------------------------------------

PICTURE_RATE_INTERVAL = "15s"  # as Grafana's $__rate_interval for a Prometheus scraping every 1-3 s
SCALED = {"bytes": (2**20, "MiB")}  # units drawn in larger steps
PICTURED = (
    "Messages applied by outcome",
    "Lag per partition (messages)",
    "End-to-end latency",
    "Stage durations",
    "Batch size",
    "Memory per process",
)


def instantiate(expr: str, rate_interval: str = "1m") -> str:
    """A dashboard expression as Prometheus itself takes it: every namespace and instance, and
    ``$__rate_interval`` replaced."""
    return (
        expr.replace("$namespace", ".*")
        .replace("$instance", ".*")
        .replace("$__rate_interval", rate_interval)
    )


def query_range(prometheus_url: str, expr: str, start: float, end: float, step: float) -> Any:
    params = urllib.parse.urlencode(
        {
            "query": instantiate(expr, PICTURE_RATE_INTERVAL),
            "start": start,
            "end": end,
            "step": step,
        }
    )
    url = f"{prometheus_url}/api/v1/query_range?{params}"
    with urllib.request.urlopen(url, timeout=30) as got:  # noqa: S310 (the operator's URL)
        answer = json.loads(got.read())
    return answer["data"]["result"]


def draw(prometheus_url: str, out: Path, minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = {spec.title: spec for _, panels in ROWS for spec in panels}
    end = time.time()
    start = end - minutes * 60
    step = max(minutes * 60 / 300, 1.0)
    drawn = {
        title: [
            (query, series)
            for query in specs[title].queries
            for series in query_range(prometheus_url, query.expr, start, end, step)
        ]
        for title in PICTURED
    }
    # The x axis starts with the first sample of the run, not with the window asked for.
    t0 = min(
        (float(s["values"][0][0]) for lines in drawn.values() for _, s in lines if s["values"]),
        default=start,
    )
    figure, axes = plt.subplots(3, 2, figsize=(14, 11))
    for ax, title in zip(axes.flat, PICTURED, strict=True):
        spec = specs[title]
        divisor, unit = SCALED.get(spec.unit, (1, spec.unit))
        for query, series in drawn[title]:
            points = [(float(t) - t0, float(v) / divisor) for t, v in series["values"]]
            label = query.legend
            for key, value in series["metric"].items():
                label = label.replace("{{" + key + "}}", value)
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, lw=1.2)
        ax.set_title(f"{title} ({unit})")
        ax.set_xlabel("seconds into the run")
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if 0 < len(handles) <= 12:
            ax.legend(fontsize=7, ncol=2)
    figure.suptitle("tm under load (from Prometheus; the Grafana dashboard draws the same queries)")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    print(f"dashboard: wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.dashboard", description=__doc__)
    parser.add_argument("command", nargs="?", choices=("json", "png"), default="json")
    parser.add_argument("--check", action="store_true", help="compare with the committed JSON")
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--out", type=Path, default=Path("docs/img/dashboard.png"))
    parser.add_argument("--minutes", type=float, default=10.0, help="the range drawn (png)")
    args = parser.parse_args(argv)
    if args.command == "png":
        draw(args.prometheus.rstrip("/"), args.out, args.minutes)
        return 0
    text = render()
    if args.check:
        if OUT.read_text() != text:
            print(f"dashboard: {OUT} is not what stack/dashboard.py builds", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"dashboard: wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
