"""tm.observability.metrics: the naming rules of DESIGN §6 and STYLE §3, the bulk observe against
prometheus-client's own ``observe``, and the multiprocess behaviour ``tm run`` relies on (zeroed
series, a dead process's gauges dropped and its counters kept), each in a fresh interpreter with
its own ``PROMETHEUS_MULTIPROC_DIR``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from tm.observability import metrics

ALL = [
    value
    for value in vars(metrics).values()
    if hasattr(value, "_type") and hasattr(value, "_documentation")
]
# The supervisor's metrics, which the API process serves from the supervisor's state.
SUPERVISOR = metrics.supervisor_families(
    configured=2, running=2, assigned=2, startup_s=1.5, restarts_total={"worker": 1}
)


def test_every_metric_follows_the_naming_rules() -> None:
    declared = [(m._name, m._type, m._documentation) for m in ALL] + [
        (f.name, f.type, f.documentation) for f in SUPERVISOR
    ]
    names = set()
    for base, kind, text in declared:
        name = base + ("_total" if kind == "counter" else "")
        names.add(name)
        assert name.startswith("tm_"), name
        assert name.endswith("_total") == (kind == "counter"), name
        assert not any(unit in name for unit in ("_ms", "_millis", "_kb", "_mb")), name
        assert text and "\n" not in text and text[0].isupper() and not text.endswith("."), name
    assert {
        "tm_messages_consumed_total",
        "tm_messages_applied_total",
        "tm_dead_letters_total",
        "tm_batch_retries_total",
        "tm_rebalances_total",
        "tm_worker_restarts_total",
        "tm_batch_size_messages",
        "tm_stage_duration_seconds",
        "tm_transactions_total",
        "tm_end_to_end_latency_seconds",
        "tm_db_pool_connections",
        "tm_startup_seconds",
        "tm_process_resident_memory_bytes",
        "tm_workers_configured",
        "tm_workers_running",
        "tm_workers_assigned",
    } <= names


def test_supervisor_families_count_restarts_for_every_role() -> None:
    (restarts,) = [f for f in SUPERVISOR if f.name == "tm_worker_restarts"]
    values = {s.labels["role"]: s.value for s in restarts.samples}
    assert values == {"worker": 1, "api": 0}


def test_buckets_resolve_the_targets() -> None:
    # DESIGN §8: 100 ms per database call, 50 ms per message; a bound on each target, and
    # finer bounds below it than above.
    assert 0.1 in metrics.STAGE_BUCKETS_S
    assert 0.05 in metrics.LATENCY_BUCKETS_S
    assert sum(b <= 0.1 for b in metrics.STAGE_BUCKETS_S) >= 6
    assert sum(b <= 0.05 for b in metrics.LATENCY_BUCKETS_S) >= 4
    for buckets in (metrics.STAGE_BUCKETS_S, metrics.LATENCY_BUCKETS_S, metrics.BATCH_BUCKETS):
        assert list(buckets) == sorted(set(buckets))


def _histogram_samples(registry: CollectorRegistry, name: str) -> dict[str, float]:
    out = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.startswith(name) and not sample.name.endswith("_created"):
                out[sample.name + json.dumps(sample.labels, sort_keys=True)] = sample.value
    return out


def _compare(values: list[float], buckets: tuple[float, ...]) -> None:
    registry = CollectorRegistry()
    one = Histogram("one", "observe", buckets=buckets, registry=registry)
    bulk = Histogram("bulk", "observe_many", buckets=buckets, registry=registry)
    for value in values:
        one.observe(value)
    metrics.observe_many(bulk, values)
    expected = {k[len("one") :]: v for k, v in _histogram_samples(registry, "one").items()}
    got = {k[len("bulk") :]: v for k, v in _histogram_samples(registry, "bulk").items()}
    sums = (expected.pop("_sum{}"), got.pop("_sum{}"))
    assert got == expected
    assert math.isclose(*sums, rel_tol=1e-9, abs_tol=1e-9)


@given(
    st.lists(
        st.floats(min_value=-1.0, max_value=100.0)
        | st.sampled_from(metrics.LATENCY_BUCKETS_S)
        | st.just(math.inf),
        max_size=200,
    )
)
def test_observe_many_counts_exactly_as_observe(values: list[float]) -> None:
    _compare(values, metrics.LATENCY_BUCKETS_S)


def test_observe_many_equals_observe_on_bounds_odd_values_no_values_and_repeats() -> None:
    bounds = metrics.STAGE_BUCKETS_S
    values = [*bounds, *bounds, -0.5, 0.0, 1e9, math.inf, 0.1, 0.1000001, 0.0999999]
    _compare(values, bounds)
    _compare([], bounds)
    _compare([7.0] * 1000, bounds)


def test_observe_many_drops_nan() -> None:
    registry = CollectorRegistry()
    bulk = Histogram("bulk", "observe_many", buckets=(1.0,), registry=registry)
    metrics.observe_many(bulk, [math.nan, 0.5, math.nan, 2.0])
    samples = _histogram_samples(registry, "bulk")
    assert samples["bulk_count{}"] == 2
    assert samples["bulk_sum{}"] == 2.5


# -- multiprocess mode, in a fresh interpreter ------------------------------------------------

MULTIPROCESS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from prometheus_client import generate_latest, multiprocess
    from tm.observability import metrics

    values = json.loads(sys.argv[1])
    for v in values:
        metrics.end_to_end_latency.observe(v)
    out = {"single": generate_latest(metrics.aggregated_registry()).decode()}

    # A worker: counters, histograms and live gauges in its own files; then it exits.
    pid = os.fork()
    if pid == 0:
        metrics.messages_applied.labels("created").inc(3)
        metrics.dead_letters.labels("invalid_json").inc()
        metrics.observe_latencies(values)
        metrics.record_memory("worker")
        metrics.db_pool_connections.labels("in_use").set(2)
        os._exit(0)
    os.waitpid(pid, 0)
    metrics.record_memory("supervisor")
    out["worker_pid"] = pid
    out["supervisor_pid"] = os.getpid()
    out["with_worker"] = generate_latest(metrics.aggregated_registry()).decode()
    multiprocess.mark_process_dead(pid)
    out["after_forget"] = generate_latest(metrics.aggregated_registry()).decode()
    print(json.dumps(out))
    """
)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _run_multiprocess(tmp_path: Path, values: list[float]) -> dict[str, Any]:
    env = {**os.environ, metrics.MULTIPROC_ENV: str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS_SCRIPT, json.dumps(values)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_multiprocess_series_start_at_zero_add_up_and_lose_only_a_gone_workers_gauges(
    tmp_path: Path,
) -> None:
    values = [0.001, 0.05, 0.05, 0.0500001, 0.2, 3.0, 100.0, -0.01, *metrics.LATENCY_BUCKETS_S]
    out = _run_multiprocess(tmp_path, values)
    single = _samples(out["single"])
    with_worker = _samples(out["with_worker"])
    after = _samples(out["after_forget"])
    worker, supervisor = str(out["worker_pid"]), str(out["supervisor_pid"])

    # Known label values exist at zero before anything happened.
    assert single[("tm_messages_applied_total", (("outcome", "created"),))] == 0
    assert single[("tm_dead_letters_total", (("reason", "row_rejected"),))] == 0
    assert single[("tm_rebalances_total", (("kind", "lost"),))] == 0
    assert ("tm_stage_duration_seconds_count", (("stage", "db"),)) in single

    # The bulk observe in the worker's files equals observe() in the supervisor's, bucket by
    # bucket (the aggregate doubles each).
    for (name, labels), value in single.items():
        if name.startswith("tm_end_to_end_latency_seconds_bucket"):
            assert with_worker[(name, labels)] == 2 * value, labels
    latency_sum = ("tm_end_to_end_latency_seconds_sum", ())
    assert math.isclose(with_worker[latency_sum], 2 * single[latency_sum])

    memory = "tm_process_resident_memory_bytes"
    assert with_worker[(memory, (("pid", worker), ("role", "worker")))] > 0
    assert with_worker[(memory, (("pid", supervisor), ("role", "supervisor")))] > 0
    assert with_worker[("tm_db_pool_connections", (("state", "in_use"),))] == 2

    # The worker is gone: its live gauges go, its counters and histograms stay in the sums.
    assert (memory, (("pid", worker), ("role", "worker"))) not in after
    assert (memory, (("pid", supervisor), ("role", "supervisor"))) in after
    assert ("tm_db_pool_connections", (("state", "in_use"),)) not in after
    assert after[("tm_messages_applied_total", (("outcome", "created"),))] == 3
    assert after[("tm_dead_letters_total", (("reason", "invalid_json"),))] == 1
    assert after[latency_sum] == with_worker[latency_sum]
