"""A batch: the decoded messages of one poll, split by kind, with the offsets that travel with
them. ``first_offsets`` is where to seek back to when the batch must be retried; ``committable``
(``{partition: next_offset}``) is what to commit once every message has reached its end.
"""

from __future__ import annotations

from tm.core.messages import Decoded, NewTask, Rejected, StatusUpdate


class Batch:
    """Built by :meth:`add` in poll order; ``*_refs`` are positions in the poll's message list."""

    __slots__ = (
        "committable",
        "create_refs",
        "creates",
        "first_offsets",
        "rejected",
        "size",
        "timestamps_ms",
        "update_refs",
        "updates",
    )

    def __init__(self) -> None:
        self.creates: list[NewTask] = []
        self.create_refs: list[int] = []
        self.updates: list[StatusUpdate] = []
        self.update_refs: list[int] = []
        self.rejected: list[tuple[int, Rejected]] = []
        self.first_offsets: dict[int, int] = {}
        self.committable: dict[int, int] = {}
        self.timestamps_ms: list[int] = []  # Kafka timestamps, for the end-to-end latency
        self.size = 0

    def add(self, ref: int, partition: int, offset: int, item: Decoded, timestamp_ms: int) -> None:
        if partition not in self.first_offsets:
            self.first_offsets[partition] = offset
        self.committable[partition] = offset + 1
        self.timestamps_ms.append(timestamp_ms)
        self.size += 1
        if type(item) is NewTask:
            self.creates.append(item)
            self.create_refs.append(ref)
        elif type(item) is StatusUpdate:
            self.updates.append(item)
            self.update_refs.append(ref)
        else:
            assert isinstance(item, Rejected)  # noqa: S101  (Decoded has three members)
            self.rejected.append((ref, item))

    def __bool__(self) -> bool:
        return self.size > 0
