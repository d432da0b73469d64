"""The soak's verdicts (bench/leaks.py): slopes, growth, and what counts as an unmistakable
leak in the short soak of `make test`."""

from __future__ import annotations

import pytest

from bench.leaks import Series, fit, trend, unbounded


def series(kind: str, values: list[float], *, every_s: float = 10.0) -> Series:
    s = Series(f"{kind} x", kind, "u")
    for i, value in enumerate(values):
        s.add(i * every_s, value)
    return s


def test_fit_finds_the_line() -> None:
    a, b = fit([0, 10, 20, 30], [5, 6, 7, 8])
    assert a == pytest.approx(5) and b == pytest.approx(0.1)


def test_a_flat_series_with_a_blip_does_not_grow() -> None:
    """A pool that opens a third connection for 30 s near the end is not a leak."""
    s = series("pg_connections", [2.0] * 40 + [3.0] * 3 + [2.0] * 2)

    t = trend(s, warmup_s=0)

    assert t is not None and t.growth == 0 and t.ok


def test_steady_growth_over_five_percent_is_a_leak() -> None:
    s = series("rss_mib", [100 + 0.2 * i for i in range(60)])  # +11.8 % over the run

    t = trend(s, warmup_s=0)

    assert t is not None and t.growth == pytest.approx(0.118, abs=0.001) and not t.ok


def test_the_warm_up_is_not_judged() -> None:
    s = series("rss_mib", [50, 80, 100, 100, 100, 100, 100])

    t = trend(s, warmup_s=20)

    assert t is not None and t.samples == 5 and t.ok


def test_growth_of_a_series_near_zero_is_taken_against_its_floor() -> None:
    lag = Series("lag", "lag", "messages", floor=1000)
    for i, value in enumerate([0, 10, 0, 20, 10, 30]):
        lag.add(i * 10, value)

    t = trend(lag, warmup_s=0)

    assert t is not None and t.ok  # +30 messages against 1000, not against 0


def test_unbounded_wants_a_rise_that_never_went_down_past_the_threshold() -> None:
    climbing = series("fds", [30 + 10 * i for i in range(8)])  # +70, never down
    wobbly = series("fds", [30, 90, 30, 100, 40, 110, 50, 120])  # +90, but it went down
    small = series("pg_connections", [2, 3, 4, 5])  # never down, +3 < 8
    ignored = series("rss_mib", [1, 100, 200, 300])  # memory is judged by the trend only

    found = unbounded([climbing, wobbly, small, ignored], warmup_s=0)

    assert found == ["fds x: 30 -> 100 u over 8 samples, never down (threshold 40)"]
