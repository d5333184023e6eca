"""Exactly-once dead letters and alerts (kafka.transactions): unit tests of the per-partition transactions and
real-broker tests with kill -9 and a zombie worker, read back with read_committed and read_uncommitted."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from nlpstream.consumers.records import InputRecord
from nlpstream.jobs.transactions import (PartitionTransactions, TransactionError, is_fenced, resume_point,
                                         transactional_id)
from tests.jobs.faults import (check_txn_topics, dirty_topic, exactness, files, read_all, reap, rows_in,
                               stream_proc, txn_env, wait_for)


# -- unit tests: no broker ----------------------------------------------------------------
class _Result:
    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error

    def wait(self, timeout_ms: float | None = None) -> bool:
        if self.error is not None:
            raise self.error
        return True


class _Manager:
    def __init__(self, producer: "_FakeProducer") -> None:
        self.producer = producer

    def send_offsets_to_transaction(self, offsets: dict, group: str) -> _Result:
        self.producer.calls.append(("offsets", {(tp.topic, tp.partition): om.offset for tp, om in offsets.items()},
                                    group))
        return _Result(self.producer.fail_commit)

    def begin_commit(self) -> _Result:
        self.producer.calls.append(("commit",))
        return _Result()


class _Future:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    def get(self, timeout: float | None = None) -> None:
        if self.error is not None:
            raise self.error


class _FakeProducer:
    def __init__(self, txn_id: str) -> None:
        self.txn_id = txn_id
        self.calls: list[tuple] = []
        self.fail_send: BaseException | None = None
        self.fail_commit: BaseException | None = None
        self.closed = False
        self._transaction_manager = _Manager(self)
        self._sender = type("S", (), {"wakeup": staticmethod(lambda: None)})()

    def init_transactions(self) -> None:
        self.calls.append(("init",))

    def begin_transaction(self) -> None:
        self.calls.append(("begin",))

    def send(self, topic: str, **kwargs: Any) -> _Future:
        self.calls.append(("send", topic, kwargs["key"]))
        return _Future(self.fail_send)

    def flush(self, timeout: float | None = None) -> None:
        self.calls.append(("flush",))

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


class ProducerFencedError(Exception):
    """Stands in for kafka.errors.ProducerFencedError (matched by name)."""


def _txns() -> tuple[PartitionTransactions, dict[str, _FakeProducer]]:
    made: dict[str, _FakeProducer] = {}

    def factory(txn_id: str) -> _FakeProducer:
        made[txn_id] = _FakeProducer(txn_id)
        return made[txn_id]

    return PartitionTransactions(None, "nlp-g", "g", "in.dlq", "alerts", factory=factory), made


def _record(partition: int, offset: int) -> InputRecord:
    return InputRecord(topic="in", partition=partition, offset=offset, key=b"k", value=b"v", timestamp_ms=0, headers=())


def test_one_transaction_per_partition_with_its_offset():
    txns, made = _txns()
    txns.open(("in", 0))
    txns.open(("in", 1))
    assert set(made) == {transactional_id("nlp-g", ("in", 0)), "nlp-g-in-1"}
    txns.send_dead_letter(_record(0, 5), "DecodeError:json", "bad")
    txns.send_dead_letter(_record(0, 6), "DecodeError:json", "bad")
    txns.send_dead_letter(_record(1, 9), "DecodeError:json", "bad")
    assert txns.flush() == {}
    assert txns.commit({("in", 0): 7, ("in", 1): 10}) == {}
    p0 = made["nlp-g-in-0"].calls
    assert p0 == [("init",), ("begin",), ("send", "in.dlq", b"k"), ("send", "in.dlq", b"k"), ("flush",),
                  ("offsets", {("in", 0): 7}, "g"), ("commit",)]
    assert made["nlp-g-in-1"].calls[-2:] == [("offsets", {("in", 1): 10}, "g"), ("commit",)]
    # an offset-only transaction (no record): begun at commit time
    txns.commit({("in", 0): 8})
    assert made["nlp-g-in-0"].calls[-3:] == [("begin",), ("offsets", {("in", 0): 8}, "g"), ("commit",)]


def test_failures_are_reported_per_partition_never_raised():
    txns, made = _txns()
    txns.open(("in", 0))
    txns.open(("in", 1))
    made["nlp-g-in-1"].fail_send = ProducerFencedError("fenced")
    txns.send_dead_letter(_record(0, 1), "E", "m")
    txns.send_dead_letter(_record(1, 1), "E", "m")
    txns.send_dead_letter(_record(2, 1), "E", "m")  # a partition without a producer: reported, not raised
    failed = txns.flush()
    assert set(failed) == {("in", 1), ("in", 2)}
    assert failed[("in", 1)].fenced and not failed[("in", 2)].fenced
    made["nlp-g-in-0"].fail_commit = RuntimeError("coordinator gone")
    failed = txns.commit({("in", 0): 2, ("in", 1): 2})
    assert set(failed) == {("in", 0), ("in", 1)}
    txns.retire([("in", 0), ("in", 1)])
    txns.reap()
    assert made["nlp-g-in-0"].closed and made["nlp-g-in-1"].closed
    assert not txns.is_open(("in", 0))


def test_open_fences_with_a_new_producer_and_retires_the_old():
    txns, made = _txns()
    txns.open(("in", 0))
    first = made["nlp-g-in-0"]
    txns.open(("in", 0))
    assert made["nlp-g-in-0"] is not first and made["nlp-g-in-0"].calls == [("init",)]
    txns.reap()
    assert first.closed


def test_alerts_join_the_transaction_of_their_partition():
    from nlpstream.sinks.alerts import Alert

    txns, made = _txns()
    txns.open(("in", 3))
    txns.send_alerts([Alert("a1", "r", "message", "in", 3, 7, "m7", None, 0)])
    assert made["nlp-g-in-3"].calls[-1] == ("send", "alerts", b"a1")


def test_resume_point_prefers_the_committed_offset():
    # committed behind the files: handled again from the committed offset (rows below files_end not rewritten)
    assert resume_point(100, 250, 0, earliest=True) == (100, False)
    assert resume_point(300, 250, 0, earliest=False) == (300, False)
    # no commit yet, files written: the first transaction may be lost, so re-read from the log start
    assert resume_point(None, 250, 0, earliest=True) == (0, False)
    # "latest" never re-reads: start where the files end and commit that position
    assert resume_point(None, 250, None, earliest=False) == (250, True)
    assert resume_point(None, None, None, earliest=False) == (None, False)


def test_fence_classification():
    import kafka.errors as errors

    assert is_fenced(errors.ProducerFencedError())
    assert is_fenced(errors.InvalidProducerEpochError())
    wrapped = TransactionError(("t", 0), "x")
    wrapped.__cause__ = errors.ProducerFencedError()
    assert is_fenced(wrapped)
    assert not is_fenced(errors.KafkaTimeoutError())


# -- real broker ---------------------------------------------------------------------------------
@pytest.fixture()
def _reap_jobs():
    yield
    reap()


def _proc(bootstrap: str, topic: str, out: Path, group: str, log: Path, *extra: str) -> Any:
    return stream_proc(bootstrap, topic, out, group, "--dlq-topic", f"{topic}.dlq", *extra, log=log,
                       env=txn_env(topic))


@pytest.mark.kafka
@pytest.mark.model
@pytest.mark.usefixtures("_reap_jobs")
def test_kill_9_dead_letters_and_alerts_exactly_once(kafka_bootstrap, make_topic, unique, tmp_path):
    parts, n = 3, 8000  # enough that three kills land mid-stream with the CPU engine at ~900 texts/s
    topic, dead = dirty_topic(kafka_bootstrap, make_topic, unique, parts, n)
    out, log = tmp_path / "out", tmp_path / "job.log"
    rng = random.Random(int(os.environ.get("NLPSTREAM_FAULT_SEED", "20261129")))
    kills = 0
    for attempt in range(8):
        proc = _proc(kafka_bootstrap, topic, out, f"{unique}-g", log)
        # after a new file appeared (not while the model loads): the next batch's transaction is open, often
        # with its files written and not yet committed
        before = len(files(out))
        wait_for(lambda: len(files(out)) > before or rows_in(out) >= n - dead or proc.poll() is not None, 120,
                 "a new file")
        time.sleep(rng.uniform(0.0, 0.4) if attempt % 2 else rng.uniform(0.4, 2.0))
        done = rows_in(out)
        assert proc.poll() is None, f"the job exited by itself ({proc.returncode}): {log.read_text()[-2000:]}"
        proc.kill()
        proc.wait(timeout=30)
        if done >= n - dead:
            break
        kills += 1
        if kills == 4:
            break
    assert kills >= 3, f"only {kills} kills landed mid-stream"
    final = _proc(kafka_bootstrap, topic, out, f"{unique}-g", log, "--idle-timeout", "6")
    assert final.wait(timeout=300) == 0, log.read_text()[-3000:]
    rows = exactness(out, parts, n - dead)
    assert rows["duplicated"] == 0 and rows["rows"] == n - dead, rows
    check_txn_topics(kafka_bootstrap, topic, dead, f"kill -9 x{kills}")
    assert "Traceback" not in log.read_text()


@pytest.mark.kafka
@pytest.mark.model
@pytest.mark.usefixtures("_reap_jobs")
def test_zombie_worker_is_fenced(kafka_bootstrap, make_topic, unique, tmp_path):
    parts, n = 2, 2000
    topic, dead = dirty_topic(kafka_bootstrap, make_topic, unique, parts, n)
    out, log = tmp_path / "out", tmp_path / "job.log"
    group = f"{unique}-g"
    a = _proc(kafka_bootstrap, topic, out, group, log, "--idle-timeout", "6")
    wait_for(lambda: rows_in(out) > 100, 120, "first rows", a)
    b = _proc(kafka_bootstrap, topic, out, group, log, "--idle-timeout", "6")
    time.sleep(4)  # both members working
    os.kill(a.pid, signal.SIGSTOP)  # a zombie: evicted after the 6 s session timeout, its transactions open
    try:
        time.sleep(10)
    finally:
        os.kill(a.pid, signal.SIGCONT)  # wakes up while b owns its partitions
    assert a.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert b.wait(timeout=300) == 0, log.read_text()[-3000:]
    check_txn_topics(kafka_bootstrap, topic, dead, "zombie (SIGSTOP 10 s)")
    text = log.read_text()
    assert "Traceback" not in text


@pytest.mark.kafka
def test_new_owner_fences_the_old_one_on_the_broker(kafka_bootstrap, make_topic, unique):
    """The primitive the zombie test relies on: opening a partition's id elsewhere aborts the old transaction
    and makes the old producer fail as fenced; the group's offset moves with the new owner's commit only."""
    from kafka import KafkaConsumer, TopicPartition

    from nlpstream.consumers.client_config import ConnectionSettings

    topic = make_topic(unique, partitions=1)
    make_topic(f"{topic}.dlq", partitions=1)
    conn = ConnectionSettings(bootstrap_servers=kafka_bootstrap)
    old = PartitionTransactions(conn, f"{unique}-p", f"{unique}-g", f"{topic}.dlq", None, timeout_s=15.0)
    new = PartitionTransactions(conn, f"{unique}-p", f"{unique}-g", f"{topic}.dlq", None, timeout_s=15.0)
    tp = (topic, 0)
    try:
        old.open(tp)
        rec = InputRecord(topic=topic, partition=0, offset=3, key=b"k", value=b"old", timestamp_ms=0, headers=())
        old.send_dead_letter(rec, "E", "m")
        assert old.flush() == {}
        new.open(tp)  # the zombie's open transaction is aborted here
        failed = old.commit({tp: 4})
        assert set(failed) == {tp} and failed[tp].fenced, failed
        new.send_dead_letter(InputRecord(topic=topic, partition=0, offset=3, key=b"k", value=b"new", timestamp_ms=0,
                                         headers=()), "E", "m")
        assert new.flush() == {} and new.commit({tp: 4}) == {}
    finally:
        old.close()
        new.close()
    assert [r.value for r in read_all(kafka_bootstrap, f"{topic}.dlq", "read_committed")] == [b"new"]
    assert sorted(r.value for r in read_all(kafka_bootstrap, f"{topic}.dlq", "read_uncommitted")) == [b"new", b"old"]
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=f"{unique}-g", enable_auto_commit=False)
    try:
        assert consumer.committed(TopicPartition(topic, 0)) == 4
    finally:
        consumer.close()


def test_a_coordinator_error_in_the_offset_commit_response_is_retried_not_raised():
    """kafka-python 2.3.3 raised AttributeError on any error in a TxnOffsetCommit response (a typo), so the
    request never completed; patched, a retriable coordinator error looks the coordinator up again and resends
    the offsets still pending, and a clean response completes the request."""
    from kafka import TopicPartition
    from kafka import errors as kerrors
    from kafka.producer import transaction_manager as tm

    from nlpstream.jobs.transactions import patch_txn_offset_commit

    patch_txn_offset_commit()
    lookups, requeued, done = [], [], []
    manager = type("M", (), {})()
    manager._pending_txn_offset_commits = {TopicPartition("t", 0): 1, TopicPartition("t", 1): 2}
    manager._lookup_coordinator = lambda kind, key: lookups.append((kind, key))
    handler = tm.TxnOffsetCommitHandler.__new__(tm.TxnOffsetCommitHandler)
    handler.transaction_manager, handler.consumer_group_id = manager, "g"
    handler._build_request = lambda: "request"
    handler.reenqueue = lambda: requeued.append(dict(handler.offsets))
    handler._result = type("R", (), {"done": lambda self: done.append(True)})()
    response = type("Resp", (), {"topics": [("t", [(0, 0), (1, kerrors.NotCoordinatorError.errno)])]})()
    handler.handle_response(response)  # raised AttributeError before the patch
    assert lookups == [("group", "g")] and requeued == [{TopicPartition("t", 1): 2}] and not done
    handler.handle_response(type("Resp", (), {"topics": [("t", [(1, 0)])]})())
    assert done == [True] and manager._pending_txn_offset_commits == {}
