"""The bad-deploy stop of tm.core.policy: bad data, however much of a batch it is, never stops a
worker; only batch after batch with nothing applied at all does."""

from __future__ import annotations

import pytest

from tm.core.policy import REFUSED_BATCHES_TO_STOP, REFUSED_ROWS_TO_STOP, RowRejectionLimit
from tm.errors import FatalError


def test_a_batch_mostly_refused_never_stops() -> None:
    """Real crawl data: a burst in which PostgreSQL refuses far more than the row threshold,
    beside good rows, batch after batch."""
    limit = RowRejectionLimit()
    for _ in range(10 * REFUSED_BATCHES_TO_STOP):
        limit.record(rejected=1_999, applied=1)


def test_every_row_of_several_batches_refused_stops() -> None:
    limit = RowRejectionLimit()
    rows = -(-REFUSED_ROWS_TO_STOP // REFUSED_BATCHES_TO_STOP)  # enough rows in that many
    for _ in range(REFUSED_BATCHES_TO_STOP - 1):
        limit.record(rejected=rows, applied=0)

    with pytest.raises(FatalError, match="refused"):
        limit.record(rejected=rows, applied=0)


def test_one_huge_batch_with_every_row_refused_does_not_stop_alone() -> None:
    limit = RowRejectionLimit()
    for _ in range(REFUSED_BATCHES_TO_STOP - 1):
        limit.record(rejected=2_000, applied=0)


def test_a_few_lone_bad_messages_on_a_quiet_topic_do_not_stop() -> None:
    """Batches of one refused row each, many in a row, stay under the row threshold."""
    limit = RowRejectionLimit()
    for _ in range(REFUSED_ROWS_TO_STOP - 1):
        limit.record(rejected=1, applied=0)

    with pytest.raises(FatalError):
        limit.record(rejected=1, applied=0)


def test_one_applied_row_starts_the_run_again() -> None:
    limit = RowRejectionLimit()
    for _ in range(3):
        for _ in range(REFUSED_BATCHES_TO_STOP - 1):
            limit.record(rejected=500, applied=0)
        limit.record(rejected=500, applied=1)


def test_batches_with_no_rows_refused_end_the_run() -> None:
    limit = RowRejectionLimit()
    for _ in range(REFUSED_BATCHES_TO_STOP - 1):
        limit.record(rejected=500, applied=0)
    limit.record(rejected=0, applied=10)
    for _ in range(REFUSED_BATCHES_TO_STOP - 1):
        limit.record(rejected=500, applied=0)


def test_thresholds_are_configurable() -> None:
    limit = RowRejectionLimit(batches=2, rows=3)
    limit.record(rejected=1, applied=0)
    limit.record(rejected=1, applied=0)  # two batches, but two rows
    with pytest.raises(FatalError, match="3 rows"):
        limit.record(rejected=1, applied=0)
