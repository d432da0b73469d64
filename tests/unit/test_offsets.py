"""The consume loop's state (tm.core.offsets) with plain numbers: commits advance in poll order,
never go back, survive a rebalance's refusal, and forget partitions that went elsewhere; a
failure rewinds everything in flight."""

from __future__ import annotations

from tm.core.offsets import Offsets


def owning(*partitions: int) -> Offsets:
    state = Offsets()
    state.assigned(set(partitions))
    return state


def test_a_batch_is_committable_only_when_every_earlier_batch_is_done() -> None:
    state = owning(0, 1)
    first = state.admit({0: 0}, {0: 10})
    second = state.admit({0: 10, 1: 0}, {0: 20, 1: 5})
    state.acked(second)  # acknowledged before the first: it waits for it
    assert state.take_commit() == {}
    assert state.in_flight == 2
    state.acked(first)
    assert state.take_commit() == {0: 20, 1: 5}
    assert state.in_flight == 0


def test_offsets_are_sent_once_and_only_newer_ones_after() -> None:
    state = owning(0, 1)
    state.acked(state.admit({0: 0, 1: 0}, {0: 10, 1: 3}))
    assert state.take_commit() == {0: 10, 1: 3}
    assert state.take_commit() == {}
    state.acked(state.admit({0: 10}, {0: 12}))
    assert state.take_commit() == {0: 12}


def test_a_commit_refused_by_a_rebalance_is_sent_again_with_the_next() -> None:
    state = owning(0, 1)
    state.acked(state.admit({0: 0, 1: 0}, {0: 10, 1: 3}))
    refused = state.take_commit()
    state.commit_refused(refused)
    state.acked(state.admit({0: 10}, {0: 12}))
    assert state.take_commit() == {0: 12, 1: 3}


def test_a_refusal_of_an_older_commit_does_not_resend_what_a_newer_one_covers() -> None:
    state = owning(0)
    state.acked(state.admit({0: 0}, {0: 10}))
    older = state.take_commit()
    state.acked(state.admit({0: 10}, {0: 20}))
    assert state.take_commit() == {0: 20}
    state.commit_refused(older)  # its answer comes late
    assert state.take_commit() == {}


def test_a_partition_that_goes_is_never_committed_or_rewound_even_if_it_comes_back() -> None:
    state = owning(0, 1)
    batch = state.admit({0: 0, 1: 100}, {0: 10, 1: 110})
    state.forget({1})
    state.assigned({1})  # back, after another member moved it on
    state.acked(batch)
    assert state.take_commit() == {0: 10}
    state.admit({0: 10, 1: 500}, {0: 20, 1: 510})
    assert state.failed(now=0.0, delay_s=1.0) == {0: 10, 1: 500}


def test_a_batch_polled_for_a_partition_not_owned_carries_nothing_of_it() -> None:
    state = owning(0)
    state.acked(state.admit({0: 0, 3: 7}, {0: 5, 3: 9}))
    assert state.take_commit() == {0: 5}


def test_a_failure_rewinds_the_earliest_offset_of_everything_in_flight_and_pauses() -> None:
    state = owning(0, 1, 2)
    state.acked(state.admit({0: 0}, {0: 10}))
    state.admit({0: 10, 1: 40}, {0: 20, 1: 50})
    state.admit({0: 20, 1: 50}, {0: 30, 1: 60})
    rewind = state.failed(now=100.0, delay_s=0.5, polled={1: 60, 2: 7})
    assert rewind == {0: 10, 1: 40, 2: 7}
    assert state.in_flight == 0
    assert state.paused
    assert state.take_commit() == {0: 10}  # the batch done before the failure still commits
    assert not state.resume_due(100.4)
    assert state.resume_due(100.5)
    assert not state.paused


def test_an_acknowledgement_of_a_batch_abandoned_by_a_failure_commits_nothing() -> None:
    state = owning(0)
    abandoned = state.admit({0: 0}, {0: 10})
    state.failed(now=0.0, delay_s=0.1)
    state.acked(abandoned)
    assert state.take_commit() == {}


def test_the_rewind_leaves_out_partitions_no_longer_owned() -> None:
    state = owning(0, 1)
    state.admit({0: 0, 1: 0}, {0: 10, 1: 10})
    state.forget({0})
    assert state.failed(now=0.0, delay_s=0.1, polled={0: 10, 1: 10}) == {1: 0}


def test_failures_in_a_row_are_counted_until_a_batch_goes_through() -> None:
    state = owning(0)
    state.failed(now=0.0, delay_s=0.1)
    state.failed(now=1.0, delay_s=0.2)
    assert state.attempt == 2
    assert state.went_through()  # ends a run of failures: the worker reports R 0
    assert state.attempt == 0
    assert not state.went_through()


def test_a_revoke_commits_every_owned_offset_again_sent_or_not() -> None:
    state = owning(0, 1)
    state.acked(state.admit({0: 0, 1: 0}, {0: 10, 1: 3}))
    assert state.take_commit() == {0: 10, 1: 3}  # sent asynchronously, maybe not confirmed
    state.forget({1})
    assert state.take_all() == {0: 10}
    assert state.take_commit() == {}


def test_the_next_offsets_of_batches_in_flight_are_those_of_owned_partitions_the_latest_last() -> (
    None
):
    offsets = Offsets()
    offsets.assigned({0, 1, 2})
    first = offsets.admit({0: 10, 1: 5}, {0: 12, 1: 6})
    second = offsets.admit({0: 12, 2: 7}, {0: 15, 2: 8})
    offsets.forget({2})  # revoked: never in a transaction of this worker again
    assert offsets.next_offsets({first}) == {0: 12, 1: 6}
    assert offsets.next_offsets({first, second}) == {0: 15, 1: 6}


def test_a_batch_that_lost_a_partition_in_flight_is_orphaned_and_the_others_are_not() -> None:
    offsets = owning(0, 1, 2)
    first = offsets.admit({0: 10}, {0: 12})
    second = offsets.admit({0: 12, 2: 7}, {0: 15, 2: 8})
    offsets.forget({2})
    # Its outputs for partition 2 are the new owner's to publish: not in a transaction of ours.
    assert offsets.orphaned({second})
    assert offsets.orphaned({first, second})
    assert not offsets.orphaned({first})
    third = offsets.admit({0: 15, 2: 8}, {0: 16, 2: 9})  # polled after: partition 2 left out
    assert not offsets.orphaned({third})
