"""The offset ledger alone: what may be committed, without a broker."""

from __future__ import annotations

from nlpstream.jobs.ledger import OffsetLedger

A, B = ("t", 0), ("t", 1)


def test_nothing_is_committable_before_it_is_durable():
    ledger = OffsetLedger()
    assert [ledger.accept(A, o) for o in (0, 1, 2)] == [True, True, True]
    ledger.handled(A, 2)
    assert ledger.has_pending() and ledger.to_commit([A]) == {}
    ledger.seal()
    ledger.made_durable()
    assert not ledger.has_pending() and ledger.to_commit([A]) == {A: 3}
    ledger.committed({A: 3})
    assert ledger.to_commit([A]) == {}


def test_only_owned_partitions_are_offered_and_a_newer_durable_offset_survives_a_commit():
    ledger = OffsetLedger()
    ledger.handled(A, 4)
    ledger.handled(B, 9)
    ledger.seal()
    ledger.made_durable()
    assert ledger.to_commit([A]) == {A: 5}
    offered = ledger.to_commit([A, B])
    ledger.handled(A, 7)  # more arrives while the commit is in flight
    ledger.seal()
    ledger.made_durable()
    ledger.committed(offered)
    assert ledger.to_commit([A, B]) == {A: 8}


def test_handled_never_moves_back():
    ledger = OffsetLedger()
    ledger.handled(A, 10)
    ledger.handled(A, 3)
    ledger.seal()
    ledger.made_durable()
    assert ledger.to_commit([A]) == {A: 11}


def test_positions_skip_what_the_files_hold_and_runs_skip_a_prefix():
    ledger = OffsetLedger()
    ledger.assigned(A, 5)  # the finished files end at offset 4
    assert [ledger.accept(A, o) for o in (3, 4, 5, 6)] == [False, False, True, True]
    assert ledger.position(A) == 7
    assert ledger.accept_run(A, [5, 6, 7, 8]) == 2 and ledger.position(A) == 9
    assert ledger.accept_run(A, [1, 2]) == 2 and ledger.position(A) == 9, "a run entirely below stays skipped"
    assert ledger.accept_run(B, [0, 1]) == 0 and ledger.position(B) == 2
    assert ledger.accept_run(B, []) == 0


def test_reassignment_discard_and_forget_drop_what_is_not_durable():
    ledger = OffsetLedger()
    ledger.handled(A, 4)
    ledger.handled(B, 4)
    ledger.discard(A)  # lost before its flush: redelivered, never committed
    ledger.seal()
    ledger.made_durable()
    assert ledger.to_commit([A, B]) == {B: 5}
    ledger.assigned(B, None)  # assigned again: resume from files and committed offsets, not from memory
    assert ledger.to_commit([A, B]) == {} and ledger.position(B) is None
    ledger.accept(A, 0)
    ledger.handled(A, 0)
    ledger.forget([A])
    assert not ledger.has_pending() and ledger.position(A) is None


def test_observe_many_equals_one_observe_per_value():
    from prometheus_client import CollectorRegistry, Histogram

    from nlpstream.jobs.metrics import observe_many

    registry = CollectorRegistry()
    buckets = (0.1, 0.5, 1.0, 5.0)
    one = Histogram("one_by_one", "x", buckets=buckets, registry=registry)
    bulk = Histogram("in_bulk", "x", buckets=buckets, registry=registry)
    values = [0.0, 0.1, 0.1000001, 0.3, 0.5, 0.99, 1.0, 4.0, 7.5, 120.0]
    for v in values:
        one.observe(v)
    observe_many(bulk, values)
    observe_many(bulk, [])

    def samples(name):
        return [(s.name.replace(name, ""), s.labels.get("le"), s.value)
                for m in registry.collect() if m.name == name for s in m.samples if not s.name.endswith("_created")]

    assert samples("one_by_one") == samples("in_bulk")


def test_settled_means_nothing_handled_or_durable_waits():
    ledger = OffsetLedger()
    tp = ("t", 0)
    ledger.assigned(tp, None)
    assert ledger.settled(tp)
    ledger.accept_run(tp, [0, 1])
    ledger.handled(tp, 1)
    assert not ledger.settled(tp)
    ledger.seal()
    ledger.made_durable()
    assert not ledger.settled(tp)
    ledger.committed(ledger.to_commit([tp]))
    assert ledger.settled(tp)


def test_a_flush_beside_the_loop_makes_only_what_was_sealed_durable():
    ledger = OffsetLedger()
    ledger.handled(A, 4)
    ledger.seal()  # the flush of offsets 0..4 starts
    ledger.handled(A, 9)  # the loop goes on meanwhile
    ledger.handled(B, 2)
    assert ledger.has_pending() and not ledger.settled(B)
    ledger.made_durable()  # the flush of the sealed records returned
    assert ledger.to_commit([A, B]) == {A: 5}, "records handled after the seal are not durable yet"
    assert ledger.has_pending()
    ledger.seal()
    ledger.made_durable()
    assert ledger.to_commit([A, B]) == {A: 10, B: 3} and not ledger.has_pending()


def test_a_failed_flush_is_sealed_again_with_the_newer_records_and_discard_drops_both():
    ledger = OffsetLedger()
    ledger.handled(A, 4)
    ledger.handled(B, 4)
    ledger.seal()  # this flush fails: nothing is made durable
    ledger.handled(("t", 2), 3)
    ledger.seal()  # this one fails as well
    ledger.handled(A, 6)
    ledger.seal()  # the retry takes the failed flushes' records and the newer ones
    assert ledger.has_pending() and ledger.to_commit([A, B]) == {}
    ledger.handled(B, 8)
    ledger.discard(B)  # lost: sealed or not, none of it may be committed
    ledger.made_durable()
    assert ledger.to_commit([A, B, ("t", 2)]) == {A: 7, ("t", 2): 4}, "a sealed partition with nothing newer"
    assert not ledger.has_pending() and ledger.settled(B)

