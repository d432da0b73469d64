"""The soak in short (``make soak`` runs it for 10 minutes): a minute of production-shaped
traffic through a real `tm run`, sampled from outside every 5 s. It fails only on an
unmistakable leak: file descriptors, PostgreSQL connections or metric files that never went
down after the warm-up and rose far past any pool size (bench.leaks.UNBOUNDED). Memory, lag and
rates are reported (on failure, or with ``-s``), never asserted: they depend on the machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import leaks, soak
from harness.stack import Stack

pytestmark = pytest.mark.e2e

SECONDS = 60.0
RATE = 400.0  # inbound messages a second: 200 tasks and their 200 updates
SAMPLE_S = 5.0
WARMUP_S = 15.0


def test_a_minute_under_load_leaks_no_descriptors_connections_or_metric_files(
    stack: Stack, tmp_path: Path
) -> None:
    result = soak.run_soak(
        stack, seconds=SECONDS, rate=RATE, sample_s=SAMPLE_S, warmup_s=WARMUP_S, log_dir=tmp_path
    )
    report = soak.render(result, command="tests/e2e/test_soak.py", facts={}, how_rate="fixed")
    print(report)

    assert result.error is None, report
    assert result.tm_exit == 0, report
    kinds = {s.kind for s in result.series}
    assert {"fds", "pg_connections", "metric_files", "metric_kib"} <= kinds, report
    assert len(result.series[0].values) >= SECONDS / SAMPLE_S - 1, report
    assert leaks.unbounded(result.series, WARMUP_S) == [], report
