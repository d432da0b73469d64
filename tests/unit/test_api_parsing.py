"""The API's pure parts: query-parameter validation, the cursor, the token, the text format."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from multidict import MultiDict

from tm.api import database
from tm.api.database import PruneRun
from tm.api.task_metrics import MAX_HOURS, parse_hours, render, render_prune
from tm.api.tasks import (
    BadRequestError,
    decode_cursor,
    encode_cursor,
    is_authorized,
    parse_list_query,
    parse_task_id,
    task_json,
)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], 24),
        (["1"], 1),
        (["72"], 72),
        ([str(MAX_HOURS)], MAX_HOURS),
        (["6abc"], None),
        (["0"], None),
        (["-1"], None),
        ([""], None),
        (["1.5"], None),
        ([" 6"], None),
        (["06"], None),
        (["+6"], None),
        (["٣"], None),  # a digit to int(), not to us
        ([str(MAX_HOURS + 1)], None),
        (["1", "2"], None),
    ],
)
def test_hours_absent_is_the_default_else_one_plain_integer_in_1_to_max_hours(
    values: list[str], expected: int | None
) -> None:
    assert parse_hours(values, 24) == expected


def test_metrics_text_is_gauges_labelled_by_time_range_with_a_whole_second_timestamp() -> None:
    text = render(6, (1, 2, 3, 6), 1_700_000_000.9).decode()
    lines = text.splitlines()
    assert text.endswith("\n") and "" not in lines
    assert lines[1] == "# TYPE web_crawl_new_tasks_total gauge"
    assert lines[2] == 'web_crawl_new_tasks_total{time_range="6h"} 1'
    assert lines[5] == 'web_crawl_completed_tasks_total{time_range="6h"} 2'
    assert lines[8] == 'web_crawl_error_tasks_total{time_range="6h"} 3'
    assert lines[11] == 'web_crawl_total_tasks_count{time_range="6h"} 6'
    assert lines[14] == 'web_crawl_metrics_timestamp{time_range="6h"} 1700000000'
    assert all(line.split()[-1] == "gauge" for line in lines if line.startswith("# TYPE"))


def test_prune_text_has_the_total_alone_before_a_run_then_the_last_run() -> None:
    assert render_prune(None).decode().splitlines() == [
        "# HELP tm_prune_deleted_rows_total Finished tasks deleted by tm db prune, all runs",
        "# TYPE tm_prune_deleted_rows_total counter",
        "tm_prune_deleted_rows_total 0",
    ]
    run = PruneRun(
        finished_at_s=1_700_000_000.25,
        deleted_rows=7,
        duration_s=1.5,
        batches=4,
        is_complete=False,
        deleted_rows_total=70,
    )
    text = render_prune(run).decode()
    values = dict(line.split(" ") for line in text.splitlines() if not line.startswith("#"))
    assert values == {
        "tm_prune_deleted_rows_total": "70",
        "tm_prune_last_run_timestamp_seconds": "1700000000.250",
        "tm_prune_last_deleted_rows": "7",
        "tm_prune_last_duration_seconds": "1.500",
        "tm_prune_last_batches": "4",
        "tm_prune_last_complete": "0",
    }
    assert text.endswith("\n") and "\n\n" not in text


def test_cursor_round_trip_keeps_microseconds() -> None:
    moment = datetime(2025, 8, 10, 10, 18, 59, 123456, tzinfo=UTC)
    task_id = str(uuid.uuid4())
    cursor = encode_cursor(moment, task_id)
    assert "=" not in cursor and "/" not in cursor and "+" not in cursor
    assert decode_cursor(cursor) == (moment, task_id)


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "garbage",
        "!!!!",
        "MTIzOm5vdC1hLXV1aWQ",
        "A" * 40,
        "w4k",
        "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OmE",
    ],
)
def test_a_malformed_cursor_decodes_to_none(cursor: str) -> None:
    assert decode_cursor(cursor) is None


def test_list_query_reads_status_limit_and_cursor_and_defaults_to_100_without_them() -> None:
    cursor = encode_cursor(datetime(2025, 1, 1, tzinfo=UTC), str(uuid.UUID(int=1)))
    status, limit, after = parse_list_query(MultiDict(status="error", limit="1000", after=cursor))
    assert (status, limit) == ("error", 1000)
    assert after == (datetime(2025, 1, 1, tzinfo=UTC), str(uuid.UUID(int=1)))
    assert parse_list_query(MultiDict()) == (None, 100, None)


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "ten"},
        {"limit": "1e3"},
        {"status": "processing"},
        {"status": ""},
        {"after": "nope"},
    ],
)
def test_list_query_refuses_a_bad_limit_an_unknown_status_or_a_bad_cursor(
    query: dict[str, str],
) -> None:
    with pytest.raises(BadRequestError):
        parse_list_query(MultiDict(query))


def test_list_query_refuses_a_parameter_given_twice() -> None:
    with pytest.raises(BadRequestError, match="at most once"):
        parse_list_query(MultiDict([("limit", "1"), ("limit", "2")]))


def test_task_id_must_be_a_canonical_uuid_in_any_case_and_comes_back_lower_cased() -> None:
    task_id = uuid.uuid4()
    assert parse_task_id(str(task_id).upper()) == str(task_id)
    for raw in ("", "x", task_id.hex, f"{{{task_id}}}", f"urn:uuid:{task_id}", f"{task_id} "):
        assert parse_task_id(raw) is None


def test_without_a_token_all_are_authorized_with_one_only_bearer_of_that_token() -> None:
    assert is_authorized(None, None)
    assert is_authorized("anything", None)
    assert is_authorized("Bearer abc", "abc")
    assert is_authorized("bearer abc", "abc")
    for header in (None, "", "Bearer", "Bearer ", "Bearer abd", "Basic abc", "abc"):
        assert not is_authorized(header, "abc")


def test_list_results_are_cut_where_the_query_cuts() -> None:
    for with_status in (False, True):
        for with_after in (False, True):
            sql = database.list_sql(status=with_status, after=with_after)
            chars = database.LIST_RESULT_CHARS + 1
            assert (f"$1, {chars}" if with_status else f"left(result, {chars})") in sql
    moment = datetime(2025, 1, 1, tzinfo=UTC)
    row = {
        "id": uuid.UUID(int=7),
        "user_email": "a@example.com",
        "user_query": "q",
        "original_url": "https://example.com/",
        "received_at": moment,
        "status": "completed",
        "result": "y" * (database.LIST_RESULT_CHARS + 1),
        "finished_at": moment,
        "created_at": moment,
        "updated_at": moment,
    }
    cut = task_json(row, cut=True)
    assert cut["result"] == "y" * database.LIST_RESULT_CHARS and cut["result_truncated"]
    whole = task_json(row)
    assert (
        len(whole["result"]) == database.LIST_RESULT_CHARS + 1 and "result_truncated" not in whole
    )
    assert whole["base_url"] == "https://example.com/"
    assert whole["created_at"] == "2025-01-01T00:00:00.000000Z"
