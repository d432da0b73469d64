"""The consume loop's state, and nothing else: the partitions a worker owns, its batches in
flight in poll order, the offsets it may commit, what its commits have sent, and its backoff.

Pure: no client, no clock, no thread. The worker (tm.worker) calls the transitions and does
the I/O they ask for (seek, pause, resume, commit); times are passed in. Offsets in
``first`` are where a batch began (where a rewind seeks); offsets in ``next`` and in what
:meth:`Offsets.take_commit` returns are Kafka's "next offset to read", which is what a
commit stores.

The rules it keeps:

- A batch's offsets become committable only once it and every batch admitted before it have
  reached their end (:meth:`acked`): commits advance in poll order, whatever order the
  acknowledgements come in.
- A commit never goes back: only offsets above the last one sent are sent again, and a
  commit the broker refused (a rebalance) is sent again with the next one.
- A partition that goes (revoked or lost) is forgotten everywhere, in the batches in flight
  too: nothing of it is committed or rewound by this worker afterwards, even if it comes back.
- A failure rewinds every owned partition of every batch in flight (and of a batch polled
  but not admitted) to its first offset, empties the flight, and pauses until the backoff
  ends.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class InFlight:
    """One admitted batch: its first and next offsets per partition, whether it is done, and
    whether one of its partitions went (revoked or lost) while it was in flight."""

    seq: int
    first: dict[int, int]
    next: dict[int, int]
    acked: bool = False
    orphaned: bool = False


@dataclass(slots=True)
class Offsets:
    owned: frozenset[int] = frozenset()
    paused: bool = False  # backing off: every owned partition is paused
    resume_at: float | None = None
    attempt: int = 0  # failures in a row
    committable: dict[int, int] = field(default_factory=dict)
    _sent: dict[int, int] = field(default_factory=dict)
    _flight: deque[InFlight] = field(default_factory=deque)
    _seq: int = 0

    # -- batches ---------------------------------------------------------------------------

    def admit(self, first: dict[int, int], next_offsets: dict[int, int]) -> int:
        """A batch starts on its way; returns its sequence number."""
        self._seq += 1
        owned = self.owned
        self._flight.append(
            InFlight(
                self._seq,
                {p: o for p, o in first.items() if p in owned},
                {p: o for p, o in next_offsets.items() if p in owned},
            )
        )
        return self._seq

    @property
    def in_flight(self) -> int:
        return len(self._flight)

    def next_offsets(self, seqs: set[int]) -> dict[int, int]:
        """The next offsets of the batches ``seqs`` in flight, per owned partition: what a
        transaction holding their outputs commits (exactly-once)."""
        merged: dict[int, int] = {}
        for batch in self._flight:
            if batch.seq in seqs:
                merged.update(batch.next)  # in poll order: a later batch's offsets are higher
        return merged

    def orphaned(self, seqs: set[int]) -> bool:
        """Whether a partition of one of the batches ``seqs`` went while it was in flight: its
        messages of that partition are another member's to process now, so its outputs must not
        be committed (exactly-once)."""
        return any(batch.orphaned for batch in self._flight if batch.seq in seqs)

    def acked(self, seq: int) -> None:
        """Batch ``seq`` reached its end; the done prefix of the flight becomes committable."""
        for batch in self._flight:
            if batch.seq == seq:
                batch.acked = True
                break
        flight = self._flight
        while flight and flight[0].acked:
            self.committable.update(flight.popleft().next)

    def failed(
        self, now: float, delay_s: float, polled: dict[int, int] | None = None
    ) -> dict[int, int]:
        """A batch failed with a transient error: returns where to seek each owned partition
        back to (the earliest first offset over the flight and ``polled``), empties the
        flight and starts the backoff (the caller pauses every owned partition)."""
        rewind: dict[int, int] = {}
        firsts = [b.first for b in self._flight]
        if polled is not None:
            firsts.append(polled)
        for first in firsts:
            for partition, offset in first.items():
                if partition in self.owned and offset < rewind.get(partition, offset + 1):
                    rewind[partition] = offset
        self._flight.clear()
        self.paused = True
        self.resume_at = now + delay_s
        self.attempt += 1
        return rewind

    def resume_due(self, now: float) -> bool:
        """Whether the backoff is over; if so, the caller resumes every owned partition."""
        if self.resume_at is None or now < self.resume_at:
            return False
        self.paused = False
        self.resume_at = None
        return True

    def went_through(self) -> bool:
        """A batch reached its end; True if that ends a run of failures."""
        recovered = self.attempt > 0
        self.attempt = 0
        return recovered

    # -- commits ---------------------------------------------------------------------------

    def take_commit(self) -> dict[int, int]:
        """The owned committable offsets not sent yet; they count as sent from now on."""
        sent = self._sent
        due = {p: o for p, o in self.committable.items() if p in self.owned and o > sent.get(p, -1)}
        sent.update(due)
        return due

    def take_all(self) -> dict[int, int]:
        """Every owned committable offset, sent or not (for a synchronous commit that must
        cover them all: on a revoke, at shutdown); they count as sent from now on."""
        due = {p: o for p, o in self.committable.items() if p in self.owned}
        self._sent.update(due)
        return due

    def commit_refused(self, offsets: dict[int, int]) -> None:
        """The broker refused a commit (a rebalance): send these offsets again with the next
        commit, unless a later one has been sent since."""
        for partition, offset in offsets.items():
            if self._sent.get(partition) == offset:
                del self._sent[partition]

    # -- ownership -------------------------------------------------------------------------

    def assigned(self, partitions: set[int]) -> None:
        self.owned = self.owned | partitions

    def forget(self, partitions: set[int]) -> None:
        """Revoked or lost: another member owns them now."""
        self.owned = self.owned - partitions
        for mapping in (self.committable, self._sent):
            for partition in partitions:
                mapping.pop(partition, None)
        for batch in self._flight:
            for partition in partitions:
                if batch.next.pop(partition, None) is not None:
                    batch.orphaned = True
                batch.first.pop(partition, None)
