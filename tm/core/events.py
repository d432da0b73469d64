"""The task events of an applied batch (DESIGN §11), from its rows and their outcomes."""

from __future__ import annotations

from tm.core.batch import Batch
from tm.core.decode import iso_utc
from tm.core.messages import Outcome, TaskEvent

_CREATED, _UPDATED = Outcome.CREATED.value, Outcome.UPDATED.value  # plain str: fast to compare


def transitions(
    batch: Batch, created: list[str | None], updated: list[str | None]
) -> list[TaskEvent]:
    """Tasks created and updates applied (not duplicates, not unchanged), in the order the
    database applied them: new tasks first, then updates in input order. A quarter of a
    microsecond per event: plain tuples, the times as the messages gave them (formatted only
    when not in the canonical form: iso_utc costs 2.5 us), the trace id sliced out of the
    traceparent."""
    events: list[TaskEvent] = [
        (task.id, "new", task.timestamp, task.traceparent[3:35] if task.traceparent else None)
        for task, outcome in zip(batch.creates, created, strict=True)
        if outcome == _CREATED
    ]
    if updated:
        events += [
            (
                update.id,
                update.status.value,
                update.finished_text or iso_utc(update.finished_at),
                update.traceparent[3:35] if update.traceparent else None,
            )
            for update, outcome in zip(batch.updates, updated, strict=True)
            if outcome == _UPDATED
        ]
    return events
