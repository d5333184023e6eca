"""Kafka transactions for the dead-letter and alert topics: one transactional producer per input partition.

Stage: checkpoint (the job's commit path). With ``kafka.transactions`` on,
the dead letters and alert records of one input partition and the group's
committed offset of that partition become visible together, in one Kafka
transaction, committed after the files or table commit of the same records
are durable. A ``read_committed`` reader of those topics then sees every
record once, whatever crashed in between.

kafka-python's ``send_offsets_to_transaction`` takes only the group id (no
KIP-447 group metadata), so a zombie is fenced the classic way: the
transactional id names the input partition (``<prefix>-<topic>-<partition>``).
Whoever is given the partition calls :meth:`PartitionTransactions.open`,
whose ``init_transactions`` fences every earlier producer with that id and
completes (or aborts) its transaction *before* the new owner reads the
group's committed offset; everything that owner then sends and commits is
based on that offset.

Failures are reported per partition, never raised from the hot path: the
job retires that partition's producer and handles the partition again from
the group's committed offset (a new producer, a new fence).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from nlpstream.consumers.client_config import ConnectionSettings
from nlpstream.consumers.dlq import dlq_headers
from nlpstream.consumers.records import InputRecord

log = logging.getLogger(__name__)
TP = tuple[str, int]
ProducerFactory = Callable[[str], Any]


_RETRIABLE_COORDINATOR_ERRORS = ("CoordinatorNotAvailableError", "NotCoordinatorError", "RequestTimedOutError",
                                  "CoordinatorLoadInProgressError")


def patch_txn_offset_commit() -> bool:
    """Make kafka-python 2.3.3 retry a transactional offset commit that meets a coordinator error.

    Its ``TxnOffsetCommitHandler.handle_response`` reads
    ``errors.CoordinatorNotAvailableError`` from a local dict, so any error
    in that response raises AttributeError inside the callback: the request
    never completes and the job's commit times out (seen after a broker
    restart, and on a group whose coordinator is still loading). A response
    that holds one of the retriable coordinator errors is answered here the
    way the Kafka protocol asks (find the group coordinator again, send the
    pending offsets again); every other response goes to kafka-python.
    Returns True when the handler was patched (only kafka-python 2.3.3).
    """
    import kafka
    from kafka import errors as kerrors
    from kafka.producer import transaction_manager as tm

    if kafka.__version__ != "2.3.3" or getattr(tm.TxnOffsetCommitHandler, "_nlpstream_patched", False):
        return False
    original = tm.TxnOffsetCommitHandler.handle_response
    retriable = tuple(getattr(kerrors, name) for name in _RETRIABLE_COORDINATOR_ERRORS)

    def handle_response(self: Any, response: Any) -> None:
        codes = [kerrors.for_code(code) for _, partitions in response.topics for _, code in partitions]
        if not any(error in retriable for error in codes) or \
                any(error is not kerrors.NoError and error not in retriable for error in codes):
            return original(self, response)
        manager = self.transaction_manager
        for (topic, partitions) in response.topics:
            for partition, code in partitions:
                if kerrors.for_code(code) is kerrors.NoError:
                    manager._pending_txn_offset_commits.pop(kafka.TopicPartition(topic, partition), None)
        manager._lookup_coordinator("group", self.consumer_group_id)
        if manager._pending_txn_offset_commits:
            self.offsets = manager._pending_txn_offset_commits
            self.request = self._build_request()
            self.reenqueue()
        else:
            self.result.done()

    tm.TxnOffsetCommitHandler.handle_response = handle_response
    tm.TxnOffsetCommitHandler._nlpstream_patched = True
    return True


class TransactionError(Exception):
    """A transaction of one input partition failed; ``fenced``: another producer holds its id now."""

    def __init__(self, tp: TP, message: str, fenced: bool = False) -> None:
        super().__init__(f"{tp[0]}-{tp[1]}: {message}")
        self.tp = tp
        self.fenced = fenced


def is_fenced(exc: BaseException) -> bool:
    """True for the errors that say another producer with our transactional id took over."""
    names = {type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None}
    return bool(names & {"ProducerFencedError", "InvalidProducerEpochError", "TransactionCoordinatorFencedError"})


def transactional_id(prefix: str, tp: TP) -> str:
    """The transactional id of input partition ``tp``: the same for every worker of the group."""
    return f"{prefix}-{tp[0]}-{tp[1]}"


def resume_point(group: int | None, files_end: int | None, log_start: int | None,
                 earliest: bool) -> tuple[int | None, bool]:
    """Where a freshly fenced partition resumes, and whether that position must be committed as is.

    ``group``: the group's committed offset (read after the fence);
    ``files_end``: the next offset the files or table do not hold;
    ``log_start``: the partition's first offset. The committed offset wins:
    records from there to ``files_end`` are handled again (dead letters and
    alerts resent in the new transaction, rows not rewritten). Without one,
    ``earliest`` re-reads from the log start, since a first transaction may
    have been lost after its files were written; otherwise the job starts
    where the files end and commits that position (``latest`` never
    re-reads). None: no position is known (the consumer's reset decides).
    """
    if group is not None:
        return group, False
    if earliest:
        return log_start, False
    return files_end, files_end is not None


class PartitionTransactions:
    """The open transactions of the input partitions this worker owns (one producer each).

    Not thread-safe: the job calls it under its lock or from the main loop.
    ``send_*`` only queue (a failure is kept and reported by :meth:`flush`);
    :meth:`open`, :meth:`flush` and :meth:`commit` block up to ``timeout_s``.
    """

    def __init__(self, connection: ConnectionSettings | None, prefix: str, group_id: str, dlq_topic: str,
                 alert_topic: str | None, timeout_s: float = 30.0, factory: ProducerFactory | None = None) -> None:
        self.prefix, self.group_id = prefix, group_id
        self.dlq_topic, self.alert_topic = dlq_topic, alert_topic
        self.timeout_s = timeout_s
        self._connection = connection
        self._factory = factory or self._kafka_producer
        self._producers: dict[TP, Any] = {}
        self._in_txn: set[TP] = set()
        self._futures: dict[TP, list[Any]] = {}
        self._failed: dict[TP, TransactionError] = {}
        self._retired: list[Any] = []

    def _kafka_producer(self, txn_id: str) -> Any:
        from kafka import KafkaProducer

        patch_txn_offset_commit()

        assert self._connection is not None
        return KafkaProducer(**self._connection.kafka_kwargs(), transactional_id=txn_id, acks="all", linger_ms=5,
                             max_request_size=16 * 1024 * 1024, max_block_ms=int(self.timeout_s * 1000))

    # -- partitions -------------------------------------------------------------------
    def open(self, tp: TP) -> None:
        """Start ``tp``'s producer afresh: fences every earlier holder of its id, ends their transaction.

        Call before reading the group's committed offset of ``tp``. Raises
        TransactionError (the caller retries later).
        """
        self.retire([tp])
        try:
            producer = self._factory(transactional_id(self.prefix, tp))
        except Exception as exc:  # noqa: BLE001 - kafka-python raises many types; translated here
            raise TransactionError(tp, f"cannot create the transactional producer: {exc}") from exc
        try:
            producer.init_transactions()
        except Exception as exc:  # noqa: BLE001
            self._retired.append(producer)
            raise TransactionError(tp, f"init_transactions failed: {exc}") from exc
        self._producers[tp] = producer

    def is_open(self, tp: TP) -> bool:
        return tp in self._producers

    def retire(self, tps: Iterable[TP]) -> None:
        """Stop using the producers of ``tps``; their open transactions are aborted (by :meth:`reap`, or
        by the next ``init_transactions`` of their ids). Safe inside rebalance callbacks: no I/O."""
        for tp in tps:
            producer = self._producers.pop(tp, None)
            if producer is not None:
                self._retired.append(producer)
            self._in_txn.discard(tp)
            self._futures.pop(tp, None)
            self._failed.pop(tp, None)

    def reap(self, timeout_s: float = 2.0) -> None:
        """Close the retired producers (closing aborts what they had open); main loop only."""
        while self._retired:
            producer = self._retired.pop()
            try:
                producer.close(timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - closing must go on
                log.debug("closing a retired transactional producer: %s", exc)

    def close(self) -> None:
        self.retire(list(self._producers))
        self.reap()

    # -- sending ----------------------------------------------------------------------
    def _send(self, tp: TP, topic: str, **kwargs: Any) -> None:
        if tp in self._failed:
            return
        producer = self._producers.get(tp)
        if producer is None:
            self._failed[tp] = TransactionError(tp, "no transactional producer open for this partition")
            return
        try:
            if tp not in self._in_txn:
                producer.begin_transaction()
                self._in_txn.add(tp)
            self._futures.setdefault(tp, []).append(producer.send(topic, **kwargs))
        except Exception as exc:  # noqa: BLE001
            self._failed[tp] = TransactionError(tp, f"send to {topic!r} refused: {exc}", is_fenced(exc))

    def send_dead_letter(self, record: InputRecord, error_class: str, message: str) -> None:
        """Queue one dead letter in the transaction of the record's partition."""
        self._send((record.topic, record.partition), self.dlq_topic, key=record.key, value=record.value,
                   headers=dlq_headers(record, error_class, message), timestamp_ms=record.timestamp_ms or None)

    def send_alerts(self, alerts: Sequence[Any]) -> None:
        """Queue alert records (keyed by alert id) in the transaction of each triggering record's partition."""
        if self.alert_topic is None:
            return
        for alert in alerts:
            self._send((alert.topic, alert.partition), self.alert_topic, key=alert.id.encode(),
                       value=alert.to_json().encode("utf-8"))

    def flush(self) -> dict[TP, TransactionError]:
        """Wait until every queued record is acknowledged (still invisible to read_committed readers).

        Returns the partitions whose sends failed (their transaction is lost:
        the caller retires them and handles them again).
        """
        for tp, futures in list(self._futures.items()):
            if tp in self._failed:
                continue
            try:
                self._producers[tp].flush(timeout=self.timeout_s)
                for fut in futures:
                    fut.get(timeout=self.timeout_s)
            except Exception as exc:  # noqa: BLE001
                self._failed[tp] = TransactionError(tp, f"records not acknowledged: {exc}", is_fenced(exc))
            else:
                del self._futures[tp]
        failed = dict(self._failed)
        return failed

    def commit(self, offsets: dict[TP, int]) -> dict[TP, TransactionError]:
        """Commit each partition's transaction with its next offset to read; returns the failed partitions.

        Call only after :meth:`flush` succeeded and the rows of every record
        below ``offsets`` are durable. A partition whose commit fails has an
        unknown outcome: the caller must open it afresh (which completes or
        aborts that transaction) and read the committed offset again.
        """
        from kafka.structs import OffsetAndMetadata, TopicPartition

        failed: dict[TP, TransactionError] = {}
        timeout_ms = int(self.timeout_s * 1000)
        for tp, offset in offsets.items():
            if tp in self._failed:
                failed[tp] = self._failed[tp]
                continue
            producer = self._producers.get(tp)
            if producer is None:
                failed[tp] = TransactionError(tp, "no transactional producer open for this partition")
                continue
            try:
                if tp not in self._in_txn:
                    producer.begin_transaction()
                    self._in_txn.add(tp)
                manager = producer._transaction_manager
                # the public calls wait without a limit; the same steps with one (house rule 8)
                result = manager.send_offsets_to_transaction(
                    {TopicPartition(*tp): OffsetAndMetadata(offset, "", -1)}, self.group_id)
                producer._sender.wakeup()
                if not result.wait(timeout_ms=timeout_ms):
                    raise TimeoutError(f"offsets not added to the transaction in {self.timeout_s:.0f}s")
                result = manager.begin_commit()
                producer._sender.wakeup()
                if not result.wait(timeout_ms=timeout_ms):
                    raise TimeoutError(f"transaction not committed in {self.timeout_s:.0f}s")
            except Exception as exc:  # noqa: BLE001
                failed[tp] = TransactionError(tp, f"commit at offset {offset} failed: {exc}", is_fenced(exc))
            else:
                self._in_txn.discard(tp)
                self._futures.pop(tp, None)
        return failed
