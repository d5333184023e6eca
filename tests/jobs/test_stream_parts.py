"""The stream job's parts on in-memory fakes: no broker, no model."""

from __future__ import annotations

import threading
from types import SimpleNamespace
import time
from concurrent.futures import Future

import pytest

from nlpstream.consumers import DecodeSettings, InputRecord
from nlpstream.consumers.dlq import DeadLetterError
from nlpstream.inference import Prediction
from nlpstream.jobs import metrics
from nlpstream.jobs.alerts import AlertRules
from nlpstream.jobs.batching import Batches
from nlpstream.jobs.checkpoint import Checkpoint
from nlpstream.jobs.config import StreamConfig, load_config
from nlpstream.jobs.liveness import Liveness
from nlpstream.jobs.rebalance import Rebalance
from nlpstream.jobs.shared import Batch, SharedState
from nlpstream.jobs.transactions import TransactionError
from nlpstream.sinks import OutputRow, SinkWriteError
from nlpstream.sinks.chunks import rows_chunk

T0, T1 = ("t", 0), ("t", 1)


def _config(**overrides) -> StreamConfig:
    return load_config(StreamConfig, None, {"kafka.topics": ["t"], **overrides})


class FakeInput:
    """What the parts use of KafkaInput, in memory: positions, end offsets, commits, pauses."""

    def __init__(self, assigned=(T0,)) -> None:
        self.assigned = list(assigned)
        self.positions: dict = {}
        self.highs: dict = {}
        self.ends: dict = {}
        self.group: dict = {}
        self.commits: list[dict] = []
        self.paused: set = set()
        self.seeks: list = []
        self.end_offsets_error: Exception | None = None

    def assignment(self):
        return list(self.assigned)

    def position(self, topic, partition):
        return self.positions.get((topic, partition))

    def highwater(self, topic, partition):
        return self.highs.get((topic, partition))

    def end_offsets(self, tps, timeout_s=None):
        if self.end_offsets_error is not None:
            raise self.end_offsets_error
        return {tp: self.ends[tp] for tp in tps if tp in self.ends}

    def beginning_offsets(self, tps):
        return {tp: 0 for tp in tps}

    def committed_offsets(self, tps, timeout_s=None):
        return {tp: self.group.get(tp) for tp in tps}

    def fetch_state(self):
        return "fake"

    def commit(self, offsets):
        self.commits.append(dict(offsets))
        return True

    def seek(self, topic, partition, offset):
        self.seeks.append(((topic, partition), offset))
        self.positions[(topic, partition)] = offset

    def pause(self, tps):
        self.paused.update(tps)

    def resume(self, tps):
        self.paused.difference_update(tps)


class Calls(list):
    """One ordered log of what the fakes were asked to do."""


class FakeSink:
    """A row sink in memory; ``gate`` (an Event) holds a flush of sealed rows until it is set."""

    def __init__(self, calls: Calls, fail_flush: bool = False, last: int | None = None) -> None:
        self.calls, self.fail_flush, self.last = calls, fail_flush, last
        self.rows: list = []
        self.sealed: list = []
        self.durable: list = []
        self.gate: threading.Event | None = None

    @property
    def buffered(self) -> int:
        return len(self.rows) + len(self.sealed)

    def write(self, rows):
        self.rows.extend(rows)

    def write_chunk(self, chunk):  # an Arrow chunk of rows: kept as one object per row, as write() keeps them
        self.rows.extend(SimpleNamespace(**row) for row in chunk.to_pylist())

    def seal(self):
        self.sealed.extend(self.rows)
        self.rows = []

    def flush_sealed(self):
        if self.gate is not None:
            assert self.gate.wait(10)
        self.calls.append("files")
        if self.fail_flush:
            raise SinkWriteError("disk full")
        self.durable.extend(self.sealed)
        self.sealed = []
        return []

    def discard(self, topic, partition):
        before = self.buffered
        self.rows = [r for r in self.rows if (r.topic, r.partition) != (topic, partition)]
        self.sealed = [r for r in self.sealed if (r.topic, r.partition) != (topic, partition)]
        return before - self.buffered

    def remove_temp_files(self, topic, partition):
        return 0

    def last_offset(self, topic, partition):
        return self.last


class FakeDlq:
    def __init__(self, calls: Calls, fail: bool = False) -> None:
        self.calls, self.fail = calls, fail
        self.sent: list = []  # queued since the last seal
        self.sealed: list = []
        self.delivered: list = []

    def send(self, record, error_class, message):
        self.sent.append((record.offset, error_class))

    def seal(self):
        self.sealed.extend(self.sent)
        self.sent = []

    def flush_sealed(self):
        self.calls.append("dlq")
        if self.fail:
            raise DeadLetterError("dlq down")
        self.delivered.extend(self.sealed)
        self.sealed = []


class FakeAlertSink:
    def __init__(self, calls: Calls) -> None:
        self.calls, self.written, self.sealed, self.delivered = calls, [], [], []

    def write(self, alerts):
        self.written.extend(alerts)

    def seal(self):
        self.sealed.extend(self.written)
        self.written = []

    def flush_sealed(self):
        self.calls.append("alerts")
        self.delivered.extend(self.sealed)
        self.sealed = []


def _parts(fail_files=False, fail_dlq=False, assigned=(T0,), last=None, background=False):
    calls = Calls()
    state = SharedState(_config())
    state.input = FakeInput(assigned)
    state.sink = FakeSink(calls, fail_flush=fail_files, last=last)
    failed: list[TransactionError] = []
    checkpoint = Checkpoint(state, FakeDlq(calls, fail=fail_dlq), [FakeAlertSink(calls)], failed.append,
                            background=background)
    checkpoint.dlq, checkpoint.alert_sink = checkpoint._dlq, checkpoint._alert_sinks[0]  # for the tests' asserts
    return state, checkpoint, calls, failed


def _alert(alert_id: str):
    from nlpstream.sinks import Alert

    return Alert(alert_id, "rule", "message", "t", 0, 0, alert_id, None, 1000)


def _record(offset: int, partition: int = 0, text: str = "fine") -> InputRecord:
    return InputRecord("t", partition, offset, None, ('{"id": "r%d", "text": "%s"}' % (offset, text)).encode(), 1000)


# -- liveness ----------------------------------------------------------------------------------
def test_idle_time_counts_only_when_every_partition_is_caught_up_and_nothing_is_in_flight():
    state = SharedState(_config())
    state.input = FakeInput(assigned=())
    live = Liveness(state)
    assert live.idle_for(100.0, last_input=10.0) == 0.0  # nothing assigned: not idle
    state.input.assigned = [T0]
    state.input.positions[T0] = 5
    state.input.highs[T0] = 8
    assert live.idle_for(100.0, last_input=10.0) == 0.0  # the partition holds more
    state.input.highs[T0] = None
    assert live.idle_for(100.0, last_input=10.0) == 90.0  # an unknown end offset does not hold the timer back
    state.in_flight.append(object())
    assert live.idle_for(100.0, last_input=10.0) == 0.0  # a batch is still being classified
    state.in_flight.clear()
    state.input.highs[T0] = 8
    state.input.positions[T0] = None
    assert live.idle_for(100.0, last_input=10.0) == 0.0  # no position yet while the partition has records
    state.input.highs[T0] = None
    assert live.idle_for(100.0, last_input=10.0) == 90.0  # neither known: the brokers decide (idle_confirmed)


def test_idle_time_starts_again_at_the_latest_assignment(monkeypatch):
    from nlpstream.jobs import liveness as module

    state = SharedState(_config())
    state.input = FakeInput(assigned=[T0, T1])
    state.input.positions.update({T0: 3, T1: 3})
    live = Liveness(state)
    monkeypatch.setattr(module.time, "monotonic", lambda: 50.0)
    live.assigned(T1)
    assert live.idle_for(60.0, last_input=10.0) == 10.0


def test_idle_stop_waits_for_the_brokers_end_offsets_to_confirm_every_partition_is_read():
    """A client that has not fetched since a broker restart knows positions but no end offsets: the timer runs
    out, the brokers say the partition holds more, the job goes on and the timer starts again."""
    state = SharedState(_config())
    state.input = FakeInput(assigned=[T0, T1])
    state.input.positions.update({T0: 5, T1: 7})
    state.input.ends.update({T0: 9, T1: 7})  # T0 holds more; the client knows no end offset (highs empty)
    live = Liveness(state)
    assert live.idle_for(100.0, last_input=10.0) == 90.0
    assert not live.idle_confirmed(100.0, 90.0)
    assert live.idle_for(104.0, last_input=10.0) == 4.0  # the timer started again at the refusal
    state.input.positions[T0] = 9  # read to its end
    assert live.idle_confirmed(120.0, 20.0)
    state.input.ends.pop(T1)  # an end offset the brokers did not give: not confirmed
    assert not live.idle_confirmed(130.0, 10.0)
    state.input.ends[T1] = 7
    state.input.end_offsets_error = TimeoutError("broker away")  # unreadable end offsets: not confirmed either
    assert not live.idle_confirmed(140.0, 10.0)
    assert live.idle_for(141.0, last_input=10.0) == 1.0
    state.input.end_offsets_error = None
    assert live.idle_confirmed(150.0, 10.0)
    state.input.positions[T1] = None  # no record since its assignment and its start not resolved:
    assert not live.idle_confirmed(160.0, 10.0)  # never committed, it may start anywhere
    state.input.group[T1] = 6
    assert not live.idle_confirmed(170.0, 10.0)  # it starts before the end
    state.input.group[T1] = 7
    assert live.idle_confirmed(180.0, 10.0)  # it starts at the end


def test_fetch_stall_only_counts_time_in_poll_and_only_partitions_that_hold_more():
    state = SharedState(_config(**{"kafka.fetch_stall_timeout": 8.0}))
    state.input = FakeInput(assigned=[T0, T1])
    state.input.positions.update({T0: 10, T1: 4})
    state.input.ends.update({T0: 20, T1: 4})  # T0 holds more, T1 is caught up
    live = Liveness(state)
    stalls = metrics.FETCH_STALLS._value.get()
    assert not live.fetch_stalled(0.0)  # the period starts now (poll clock 0)
    live.polled(7.0)
    assert not live.fetch_stalled(100.0)  # 7 s of polling: not yet, however long the loop took outside poll
    assert not live.fetch_stalled(101.0)  # checked at most every min(5, timeout/4) s
    live.polled(1.0)
    assert live.fetch_stalled(103.0)
    assert metrics.FETCH_STALLS._value.get() == stalls + 1
    live.mark_progress([T0])  # T0 gave records: a full period again
    live.polled(7.9)
    assert not live.fetch_stalled(200.0)


def test_fetch_stall_is_not_judged_while_paused_pending_or_the_broker_is_unreachable():
    state = SharedState(_config(**{"kafka.fetch_stall_timeout": 4.0}))
    state.input = FakeInput(assigned=[T0])
    state.input.positions[T0] = 0
    state.input.ends[T0] = 9
    live = Liveness(state)
    live.mark_progress([T0])
    live.polled(10.0)
    state.paused = True
    assert not live.fetch_stalled(10.0)
    state.paused, state.pending[T0] = False, 1.0
    assert not live.fetch_stalled(20.0)  # waiting for its transactional prepare: paused on purpose
    del state.pending[T0]
    state.input.end_offsets_error = OSError("broker down")
    assert not live.fetch_stalled(30.0)  # an unreachable broker is no client stall: the period starts again
    state.input.end_offsets_error = None
    assert not live.fetch_stalled(40.0)
    live.polled(4.0)
    assert live.fetch_stalled(50.0)


# -- checkpoint --------------------------------------------------------------------------------
def test_flush_makes_dead_letters_then_files_then_alerts_durable_before_anything_is_committed():
    state, checkpoint, calls, _ = _parts()
    state.ledger.accept_run(T0, [0, 1, 2])
    state.ledger.handled(T0, 2)
    checkpoint.commit()
    assert state.input.commits == []  # handled is not durable: nothing to commit
    assert checkpoint.flush()
    assert calls == ["dlq", "files", "alerts"]
    checkpoint.commit()
    assert state.input.commits == [{T0: 3}]
    assert state.committed == {T0: 3} and state.ledger.to_commit([T0]) == {}


@pytest.mark.parametrize("fail", ["dlq", "files"])
def test_a_failed_flush_commits_nothing_and_keeps_the_counts(fail):
    state, checkpoint, calls, _ = _parts(fail_files=fail == "files", fail_dlq=fail == "dlq")
    checkpoint.write_chunk(rows_chunk([]))
    checkpoint.dead_letter(_record(0), "DecodeError:json", "bad", "json")
    state.ledger.accept_run(T0, [0])
    state.ledger.handled(T0, 0)
    retries = metrics.SINK_RETRIES._value.get()
    assert not checkpoint.flush()
    assert metrics.SINK_RETRIES._value.get() == retries + 1
    assert "alerts" not in calls  # stopped at the first failure, in order
    checkpoint.commit()
    assert state.input.commits == [] and state.summary.dead_lettered == 0
    assert checkpoint.has_pending()


def test_flush_counts_labeled_rows_and_dead_letters_once_durable():
    state, checkpoint, _, _ = _parts()
    from nlpstream.sinks import OutputRow

    rows = [OutputRow("t", 0, i, f"r{i}", "x", "positive", 0.9, 1000, 1000, "m") for i in range(3)]
    checkpoint.write_chunk(rows_chunk(rows))
    checkpoint.dead_letter(_record(3), "DecodeError:json", "bad", "json")
    assert state.summary.labeled == 0
    assert checkpoint.flush()
    assert state.summary.labeled == 3 and state.summary.dead_lettered == 1
    assert state.summary.labels == {"positive": 3}


def test_discard_drops_what_is_not_durable_of_one_partition_only():
    state, checkpoint, _, _ = _parts(assigned=[T0, T1])
    from nlpstream.sinks import OutputRow

    checkpoint.write_chunk(rows_chunk([OutputRow("t", p, 0, "r", "x", "positive", 0.9, 1000, 1000, "m") for p in (0, 1)]))
    for tp in (T0, T1):
        state.ledger.accept_run(tp, [0])
        state.ledger.handled(tp, 0)
    checkpoint.discard("t", 0)
    assert checkpoint.flush()
    checkpoint.commit()
    assert state.input.commits == [{T1: 1}] and state.summary.labeled == 1


def _handle(state, checkpoint, tp, offsets, label="positive"):
    """What the batching part does for labeled records: rows written, offsets handled."""
    from nlpstream.sinks import OutputRow

    checkpoint.write_chunk(rows_chunk([OutputRow(tp[0], tp[1], o, f"r{o}", "x", label, 0.9, 1000, 1000, "m") for o in offsets]))
    state.ledger.accept_run(tp, offsets)
    state.ledger.handled(tp, offsets[-1])


def test_a_flush_beside_the_loop_makes_only_the_sealed_records_durable_and_committable():
    state, checkpoint, calls, _ = _parts(background=True)
    state.sink.gate = threading.Event()
    _handle(state, checkpoint, T0, [0, 1, 2])
    checkpoint.write_alerts([_alert("before-the-seal")])
    assert checkpoint.start_flush() and checkpoint.flushing
    assert not checkpoint.start_flush(), "one flush in flight at a time"
    _handle(state, checkpoint, T0, [3, 4])  # the loop goes on while the writer thread flushes
    checkpoint.dead_letter(_record(5), "DecodeError:json", "bad", "json")
    checkpoint.write_alerts([_alert("after-the-seal")])
    state.ledger.accept_run(T0, [5])
    state.ledger.handled(T0, 5)
    assert checkpoint.reap() is None
    checkpoint.commit()
    assert state.input.commits == [] and state.summary.labeled == 0
    state.sink.gate.set()
    checkpoint._in_flight.result(timeout=10)
    assert checkpoint.reap() is True and not checkpoint.flushing
    assert calls == ["dlq", "files", "alerts"]
    assert [r.offset for r in state.sink.durable] == [0, 1, 2] and state.summary.labeled == 3
    assert checkpoint.dlq.delivered == [], "sent after the seal"
    assert [a.id for a in checkpoint.alert_sink.delivered] == ["before-the-seal"]
    assert state.summary.dead_lettered == 0 and state.summary.alerts == 1
    checkpoint.commit()
    assert state.input.commits == [{T0: 3}], "records handled after the seal are not committed"
    assert checkpoint.has_pending()
    assert checkpoint.flush()  # the synchronous flush (rebalance, last flush) takes the rest
    checkpoint.commit()
    assert state.input.commits[-1] == {T0: 6} and state.summary.labeled == 5
    assert checkpoint.dlq.delivered == [(5, "DecodeError:json")] and state.summary.dead_lettered == 1
    assert [a.id for a in checkpoint.alert_sink.delivered] == ["before-the-seal", "after-the-seal"]
    assert state.summary.alerts == 2
    checkpoint.close()


def test_a_failed_flush_beside_the_loop_is_retried_with_the_newer_records_first_in_line():
    state, checkpoint, calls, _ = _parts(fail_files=True, background=True)
    _handle(state, checkpoint, T0, [0, 1])
    retries = metrics.SINK_RETRIES._value.get()
    assert checkpoint.start_flush()
    checkpoint._in_flight.exception(timeout=10)
    assert checkpoint.reap() is False and metrics.SINK_RETRIES._value.get() == retries + 1
    assert checkpoint.failing and not checkpoint.retry_due(time.monotonic()), "retried after a backoff"
    assert checkpoint.retry_due(time.monotonic() + 0.6)
    checkpoint.commit()
    assert state.input.commits == [] and state.summary.labeled == 0 and checkpoint.has_pending()
    _handle(state, checkpoint, T0, [2])
    state.sink.fail_flush = False
    assert checkpoint.start_flush()
    checkpoint._in_flight.result(timeout=10)
    assert checkpoint.reap() is True
    assert [r.offset for r in state.sink.durable] == [0, 1, 2] and state.summary.labeled == 3
    assert not checkpoint.failing and checkpoint.retry_due(time.monotonic())
    checkpoint.commit()
    assert state.input.commits == [{T0: 3}] and not checkpoint.has_pending()
    checkpoint.close()


def test_an_unexpected_error_of_a_flush_beside_the_loop_stops_the_job_even_from_a_callback():
    state, checkpoint, _, _ = _parts(background=True)
    state.sink.flush_sealed = lambda: 1 / 0  # a bug, not a storage outage
    _handle(state, checkpoint, T0, [0])
    checkpoint.start_flush()
    with pytest.raises(ZeroDivisionError):
        checkpoint.wait()  # e.g. inside a rebalance callback, whose errors the client swallows
    assert isinstance(state.fatal, ZeroDivisionError), "kept for the loop to raise after poll"
    checkpoint.commit()
    assert state.input.commits == []
    checkpoint.close()


def test_discard_waits_for_the_flush_in_flight_and_keeps_what_it_made_durable():
    state, checkpoint, _, _ = _parts(assigned=[T0, T1], background=True)
    state.sink.gate = threading.Event()
    _handle(state, checkpoint, T0, [0, 1])
    _handle(state, checkpoint, T1, [0])
    assert checkpoint.start_flush()
    _handle(state, checkpoint, T0, [2, 3])  # handled after the seal: dropped by the discard
    threading.Timer(0.2, state.sink.gate.set).start()
    checkpoint.discard("t", 0)  # a lost partition: waits for the writer thread first
    assert not checkpoint.flushing and state.summary.labeled == 3
    assert checkpoint.flush()
    checkpoint.commit()
    assert state.input.commits == [{T0: 2, T1: 1}], "offsets 2..3 of t-0 are redelivered, 0..1 were durable"
    assert [r.offset for r in state.sink.durable if r.partition == 0] == [0, 1]
    checkpoint.close()


def test_a_loop_ahead_of_the_writer_thread_waits_for_its_flush_instead_of_pausing():
    state, checkpoint, _, _ = _parts(background=True)
    state.sink.gate = threading.Event()
    _handle(state, checkpoint, T0, list(range(4)))
    assert not checkpoint.wait_if_behind(1), "nothing in flight: nothing to wait for"
    checkpoint.start_flush()
    _handle(state, checkpoint, T0, list(range(4, 8)))
    assert not checkpoint.wait_if_behind(9) and checkpoint.flushing, "below the limit the loop goes on"
    threading.Timer(0.2, state.sink.gate.set).start()
    assert checkpoint.wait_if_behind(8) and not checkpoint.flushing and state.summary.labeled == 4
    checkpoint.close()


def test_the_watchdog_stops_the_process_when_a_flush_beside_the_loop_runs_too_long(monkeypatch):
    import types

    from nlpstream.jobs import liveness as liveness_module

    state, checkpoint, _, _ = _parts(background=True)
    state.sink.gate = threading.Event()
    _handle(state, checkpoint, T0, [0])
    live = Liveness(state)
    live.config = types.SimpleNamespace(stall_timeout=0.3)  # the config's floor is 30 s; the watchdog's rule is not
    live.watch_flush(checkpoint.flushing_since)
    exits: list[int] = []

    class Exited(Exception):
        pass

    def fake_exit(code):
        exits.append(code)
        raise Exited

    monkeypatch.setattr(liveness_module.os, "_exit", fake_exit)
    assert checkpoint.flushing_since() is None
    checkpoint.start_flush()
    deadline = time.monotonic() + 5
    with pytest.raises(Exited):
        while time.monotonic() < deadline:  # the loop beats on: only the flush is stuck
            live.heartbeat()
            done = threading.Event()
            threading.Timer(0.1, done.set).start()
            live._done = done  # one watchdog round at a time, between beats
            live._watchdog()
    assert exits == [liveness_module.STALL_EXIT_CODE]
    state.sink.gate.set()
    checkpoint.wait()
    assert checkpoint.flushing_since() is None
    checkpoint.close()


def test_a_beating_loop_without_a_stuck_flush_is_not_stopped(monkeypatch):
    import types

    from nlpstream.jobs import liveness as liveness_module

    state, checkpoint, _, _ = _parts(background=True)
    live = Liveness(state)
    live.config = types.SimpleNamespace(stall_timeout=0.3)
    live.watch_flush(checkpoint.flushing_since)
    monkeypatch.setattr(liveness_module.os, "_exit", lambda code: pytest.fail("exited"))
    _handle(state, checkpoint, T0, [0])
    checkpoint.start_flush()  # finishes at once
    checkpoint._in_flight.result(timeout=10)
    for _ in range(6):
        live.heartbeat()
        done = threading.Event()
        threading.Timer(0.1, done.set).start()
        live._done = done
        live._watchdog()
    checkpoint.close()


def test_assignment_waits_for_the_flush_in_flight_before_it_lists_the_files():
    state, checkpoint, _, _ = _parts(assigned=[T0], last=41, background=True)
    state.sink.gate = threading.Event()
    _handle(state, checkpoint, T0, [0])
    checkpoint.start_flush()
    threading.Timer(0.2, state.sink.gate.set).start()
    _rebalance(state, checkpoint).on_assigned([T0])
    assert not checkpoint.flushing and state.sink.durable and state.ledger.position(T0) == 42
    checkpoint.close()


def test_with_transactions_every_flush_stays_on_the_loop():
    state = SharedState(_config())
    state.txn = object()  # any transactions part: the checkpoint only looks whether there is one
    checkpoint = Checkpoint(state, FakeDlq(Calls()), [], lambda error: None, background=True)
    assert not checkpoint.background


def test_commit_sends_resume_positions_and_skips_partitions_no_longer_owned():
    state, checkpoint, _, _ = _parts(assigned=[T0])
    state.resume_commits.update({T0: 40, T1: 7})
    checkpoint.commit()
    assert state.input.commits == [{T0: 40}]
    assert state.resume_commits == {T1: 7} and state.committed == {T0: 40}


def test_commit_moves_past_offsets_without_records_once_everything_accepted_is_committed():
    state, checkpoint, _, _ = _parts()
    state.committed[T0] = 20
    state.ledger.accept_run(T0, [19])
    state.input.positions[T0] = 21  # a transaction marker at offset 20
    checkpoint.commit()
    assert state.input.commits == [{T0: 21}]
    state.registry_paused = True  # records put back during a registry outage: nothing settles
    state.input.positions[T0] = 25
    checkpoint.commit()
    assert len(state.input.commits) == 1


class FakeTxn:
    def __init__(self, fail: set) -> None:
        self.fail, self.committed = fail, []

    def flush(self):
        return {}

    def commit(self, offsets):
        self.committed.append(dict(offsets))
        return {tp: TransactionError(tp, "lost") for tp in offsets if tp in self.fail}


def test_transactional_commit_commits_the_others_and_rewinds_the_failed_partition():
    state, checkpoint, _, failed = _parts(assigned=[T0, T1])
    state.txn = FakeTxn(fail={T1})
    for tp in (T0, T1):
        state.ledger.accept_run(tp, [0, 1])
        state.ledger.handled(tp, 1)
    assert checkpoint.flush()
    checkpoint.commit()
    assert state.txn.committed == [{T0: 2, T1: 2}] and state.input.commits == []
    assert state.committed == {T0: 2}
    assert [e.tp for e in failed] == [T1]


# -- rebalance ---------------------------------------------------------------------------------
def _rebalance(state, checkpoint, drained=None):
    drained = [] if drained is None else drained
    return Rebalance(state, checkpoint, Liveness(state), lambda: drained.append(True))


def test_assignment_resumes_after_the_files_and_settles_the_resume_commit():
    state, checkpoint, _, _ = _parts(assigned=[T0], last=41)
    drained: list = []
    rebalance = _rebalance(state, checkpoint, drained)
    rebalance.on_assigned([T0])
    assert drained == [True]  # batches in flight are handled first
    assert state.input.seeks == [(T0, 42)] and state.ledger.position(T0) == 42
    assert rebalance.settle_due(0.0)
    state.input.group[T0] = 10  # the group's commit is behind the files
    state.input.ends[T0] = 50
    rebalance.settle_assigned(0.0)
    assert not rebalance.unsettled() and state.resume_commits == {T0: 42}
    checkpoint.commit()
    assert state.input.commits == [{T0: 42}]


def test_revocation_flushes_and_a_failed_flush_discards_only_the_revoked_partitions():
    state, checkpoint, _, _ = _parts(fail_files=True, assigned=[T0, T1])
    rebalance = _rebalance(state, checkpoint)
    for tp in (T0, T1):
        state.ledger.accept_run(tp, [0])
        state.ledger.handled(tp, 0)
        state.committed[tp] = 0
    state.input.assigned = [T1]
    rebalance.on_revoked([T0])
    assert T0 not in state.committed and state.ledger.position(T0) is None
    state.sink.fail_flush = False
    assert checkpoint.flush()
    checkpoint.commit()
    assert state.input.commits == [{T1: 1}]  # T0's handled records were dropped, never committed


def test_a_lost_transaction_rewinds_its_partition_and_pauses_it():
    state, checkpoint, _, _ = _parts(assigned=[T0])
    state.txn = type("Txn", (), {"retire": lambda self, tps: None})()
    rebalance = _rebalance(state, checkpoint)
    state.ledger.accept_run(T0, [0, 1])
    state.ledger.handled(T0, 1)
    state.committed[T0] = 0
    rebalance.txn_failed(TransactionError(T0, "lost"))
    assert T0 in state.pending and T0 in state.input.paused
    assert not checkpoint.has_pending() and T0 not in state.committed
    assert not rebalance.take_rebuild_wanted()
    rebalance.txn_failed(TransactionError(T0, "fenced", fenced=True))
    assert rebalance.take_rebuild_wanted() and not rebalance.take_rebuild_wanted()


# -- batching ----------------------------------------------------------------------------------
class BisectEngine:
    """A stand-in engine with ``classify`` only: the batch raises when it holds a bad text."""

    model_name = "fake"

    def classify(self, texts):
        if any("poison" in t for t in texts):
            raise ValueError("cannot label this")
        return [Prediction("positive", 0.9) for _ in texts]


def test_a_text_that_fails_alone_is_dead_lettered_and_the_rest_are_written_in_order():
    state, checkpoint, _, _ = _parts()
    batches = Batches(state, BisectEngine(), DecodeSettings(), AlertRules(state.config.alerts), checkpoint,
                      lambda tp: None)
    records = [_record(0), _record(1, text="poison"), InputRecord("t", 0, 2, None, b"not json", 1000), _record(3)]
    accepted, seen = batches.accept(records)
    assert seen == [T0] and len(accepted) == 4
    batches.enqueue(accepted)
    batches.finish_all()
    assert [r.offset for r in state.sink.rows] == [0, 3]
    assert sorted(o for o, _ in checkpoint._dlq.sent) == [1, 2]
    assert checkpoint.flush()
    checkpoint.commit()
    assert state.input.commits == [{T0: 4}]
    again, _ = batches.accept(records)  # already handled in this session: skipped
    assert again == [] and state.summary.skipped == 4
    batches.close()


def test_rows_below_the_files_end_are_not_written_again():
    state, checkpoint, _, _ = _parts()
    batches = Batches(state, BisectEngine(), DecodeSettings(), AlertRules(state.config.alerts), checkpoint,
                      lambda tp: 2 if tp == T0 else None)
    batches.enqueue([_record(i) for i in range(4)])
    batches.finish_all()
    assert [r.offset for r in state.sink.rows] == [2, 3]
    assert state.ledger.has_pending()
    batches.close()


def test_a_batch_wholly_below_the_files_end_writes_no_row_and_still_sends_its_alerts():
    state, checkpoint, _, _ = _parts()
    batches = Batches(state, NegativeEngine(), DecodeSettings(keep_fields=()), AlertRules(state.config.alerts),
                      checkpoint, lambda tp: 10 if tp == T0 else None)
    batches.enqueue([_record(i) for i in range(4)])
    batches.finish_all()
    assert state.sink.rows == [] and state.ledger.has_pending()
    assert [a.offset for a in checkpoint.alert_sink.written] == [0, 1, 2, 3], "alerts are sent again below the floor"
    batches.close()


def test_drain_keeps_a_classification_failure_for_the_loop_and_drops_the_batches():
    state, checkpoint, _, _ = _parts()
    batches = Batches(state, BisectEngine(), DecodeSettings(), AlertRules(state.config.alerts), checkpoint,
                      lambda tp: None)
    failed: Future = Future()
    failed.set_exception(RuntimeError("device gone"))
    state.in_flight.append(Batch([_record(0)], [], [], failed))
    batches.drain()
    assert isinstance(state.fatal, RuntimeError) and not state.in_flight and not state.ledger.has_pending()
    batches.close()


class NegativeEngine(BisectEngine):
    def classify(self, texts):
        return [Prediction("negative", 0.99) for _ in texts]


class GatedEngine(BisectEngine):
    """Classifies only once ``gate`` is set: keeps a batch in flight on the classifier thread."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def classify(self, texts):
        assert self.gate.wait(10), "the test never opened the gate"
        return super().classify(texts)


def test_a_batch_in_flight_when_its_partition_is_rewound_is_not_handled_after_the_rewind():
    """A transaction fails while a batch of the partition is being classified; the partition is re-fenced
    (no longer pending) before the batch finishes: that batch's rows must not be written (they would land
    beyond the rows the rewind discarded), and the redelivered records are written once."""
    state, checkpoint, _, _ = _parts(assigned=[T0])
    state.txn = type("Txn", (), {"retire": lambda self, tps: None, "send_alerts": lambda self, alerts: None,
                                 "send_dead_letter": lambda self, *args: None})()
    rebalance = _rebalance(state, checkpoint)
    engine = GatedEngine()
    batches = Batches(state, engine, DecodeSettings(), AlertRules(state.config.alerts), checkpoint, lambda tp: None)
    assert state.config.pipeline_depth == 1
    old = [_record(i) for i in range(10, 14)]
    accepted, _ = batches.accept(old)
    batches.enqueue(accepted)  # classified on the worker thread, blocked at the gate
    assert len(state.in_flight) == 1
    rebalance.txn_failed(TransactionError(T0, "lost"))
    del state.pending[T0]  # re-fenced at once (what prepare does), before the batch finished
    state.ledger.assigned(T0, 0)
    engine.gate.set()
    batches.finish_all()
    assert state.sink.rows == [] and not state.ledger.has_pending()
    redelivered = [_record(i) for i in range(14)]
    accepted, _ = batches.accept(redelivered)
    assert [r.offset for r in accepted] == list(range(14))
    batches.enqueue(accepted)
    batches.finish_all()
    assert [r.offset for r in state.sink.rows] == list(range(14))
    batches.close()


def test_backpressure_pauses_fetching_only_while_flushes_fail():
    """Rows beyond twice ``max_buffered_rows`` pause fetching only when the flush fails: a succeeding flush
    is waited for instead, and a pause would drop what the client prefetched (librdkafka refetches it)."""
    from nlpstream.jobs.stream import StreamJob

    state, checkpoint, _, _ = _parts(fail_files=True)
    state.config.output.max_buffered_rows = 2
    job = StreamJob(state.config)
    job._state, job._checkpoint = state, checkpoint
    checkpoint.write_chunk(rows_chunk([OutputRow("t", 0, o, f"r{o}", "x", "positive", 0.9, 1000, 1000, "m") for o in range(4)]))
    state.ledger.handled(T0, 3)
    job._apply_backpressure()
    assert not state.paused and state.input.paused == set(), "a flush that has not failed pauses nothing"
    assert not checkpoint.flush() and checkpoint.failing
    job._apply_backpressure()
    assert state.paused and state.input.paused == {T0}
    state.sink.fail_flush = False
    assert checkpoint.flush()
    job._apply_backpressure()
    assert not state.paused and state.input.paused == set()
