"""The checkpoint of the stream job: ordered flush (dead letters, files, alerts durable), then commit.

Offsets are committed only after the Parquet files (or table commit)
holding those rows, the dead letters and the alerts of the same records
are durable: :meth:`Checkpoint.flush` makes everything handled durable, in
that order, and only then moves the ledger's handled offsets to durable;
:meth:`Checkpoint.commit` commits durable offsets of the partitions still
owned (plain consumer commit, or one Kafka transaction per input partition
with ``kafka.transactions``, see jobs/transactions.py). Rebalance callbacks
flush but never commit: the next owner resumes from the files instead.

The dead letters, rows and alerts of handled records are written through
this part, which counts them until they are durable (then they reach the
summary and the metrics).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from nlpstream.consumers import InputRecord
from nlpstream.consumers.dlq import DeadLetterError, DeadLetterQueue
from nlpstream.jobs import metrics
from nlpstream.jobs.shared import LOGGER_NAME, MAX_BACKOFF_S, TP, SharedState
from nlpstream.sinks import OutputRow
from nlpstream.jobs.transactions import TransactionError
from nlpstream.sinks import AlertSink, OutputRow, SinkError

log = logging.getLogger(LOGGER_NAME)


class Checkpoint:
    """What is handled but not durable yet, the flush that makes it durable and the commit after it.

    ``on_txn_failed`` is called (lock held) for each partition whose
    transaction is lost: that partition is handled again from the group's
    committed offset (see :meth:`jobs.rebalance.Rebalance.txn_failed`).
    """

    def __init__(self, state: SharedState, dlq: DeadLetterQueue, alert_sinks: Sequence[AlertSink],
                 on_txn_failed: Callable[[TransactionError], None]) -> None:
        self._state = state
        self._dlq = dlq
        self._alert_sinks = list(alert_sinks)
        self._on_txn_failed = on_txn_failed
        self._buffered_rows: list[OutputRow] = []  # written to the sink, not yet durable
        self._dlq_pending: list[tuple[str, str]] = []  # (topic, reason)
        self._alerts_pending = 0
        self._flush_failing_since: float | None = None  # monotonic start of a sink outage (one WARNING each)

    # -- handled, not durable yet (caller holds the lock) -----------------------------------
    def dead_letter(self, record: InputRecord, error_class: str, message: str, reason: str) -> None:
        if self._state.txn is not None:
            self._state.txn.send_dead_letter(record, error_class, message)
        else:
            self._dlq.send(record, error_class, message)
        self._dlq_pending.append((record.topic, reason))

    def write_rows(self, rows: list[OutputRow]) -> None:
        self._state.sink.write(rows)
        self._buffered_rows.extend(rows)

    def write_alerts(self, alerts: Sequence[Any]) -> None:
        for alert in alerts:
            metrics.ALERTED.labels(alert.kind).inc()
        for sink in self._alert_sinks:
            sink.write(alerts)
        if self._state.txn is not None:
            self._state.txn.send_alerts(alerts)
        self._alerts_pending += len(alerts)

    def has_pending(self) -> bool:
        return self._state.ledger.has_pending()

    def discard(self, topic: str, partition: int) -> None:
        """Drop what of the partition is handled but not durable (it will be redelivered). Caller holds the lock."""
        state = self._state
        dropped = state.sink.discard(topic, partition)
        state.ledger.discard((topic, partition))
        self._buffered_rows = [row for row in self._buffered_rows if row.partition != partition or row.topic != topic]
        if dropped:
            log.info("dropped %d rows of %s-%d that were not durable yet; they will be redelivered",
                     dropped, topic, partition)

    # -- flush ------------------------------------------------------------------------------------
    def flush(self) -> bool:
        """Make everything handled durable (DLQ, files, alerts); True on success. Caller holds the lock."""
        state = self._state
        try:
            self._dlq.flush()
            lost = state.txn.flush() if state.txn is not None else {}
            for error in lost.values():  # that partition's records are handled again from the committed offset
                self._on_txn_failed(error)
            files = state.sink.flush()
            for sink in self._alert_sinks:
                sink.flush()
        except (DeadLetterError, SinkError) as exc:
            metrics.SINK_RETRIES.inc()
            if self._flush_failing_since is None:  # one WARNING per outage, the retries at DEBUG
                self._flush_failing_since = time.monotonic()
                log.warning("flush failed, retrying with backoff and committing nothing until it succeeds: %s", exc)
            else:
                log.debug("flush failed again: %s", exc)
            return False
        if self._flush_failing_since is not None:
            log.info("flush succeeded again after %.0fs of failures", time.monotonic() - self._flush_failing_since)
            self._flush_failing_since = None
        now_ms = time.time() * 1000
        rows = self._buffered_rows
        summary = state.summary
        summary.labels.update(row.label for row in rows)
        for topic, n in Counter(row.topic for row in rows).items():
            metrics.LABELED.labels(topic).inc(n)
        metrics.observe_many(metrics.END_TO_END_SECONDS, [max(0.0, (now_ms - row.event_time_ms) / 1000) for row in rows])
        for topic, reason in self._dlq_pending:
            metrics.DEAD_LETTERED.labels(topic, reason).inc()
        summary.labeled += len(self._buffered_rows)
        summary.dead_lettered += len(self._dlq_pending)
        summary.alerts += self._alerts_pending
        summary.files.extend(f.path for f in files)
        self._buffered_rows.clear()
        self._dlq_pending.clear()
        self._alerts_pending = 0
        state.ledger.made_durable()
        return True

    def flush_until_durable(self, heartbeat: Callable[[], None]) -> None:
        """Flush what is in hand, retrying with backoff for a while (the last flush, before the last commit)."""
        deadline = time.monotonic() + 60.0
        delay = 0.5
        while True:
            heartbeat()
            with self._state.lock:
                if not self.has_pending() or self.flush():
                    break
            if time.monotonic() >= deadline:
                log.error("final flush failed for 60s; uncommitted records will be redelivered")
                break
            time.sleep(delay)
            delay = min(MAX_BACKOFF_S, delay * 2)

    # -- commit -------------------------------------------------------------------------------------
    def commit(self) -> None:
        state = self._state
        with state.lock:
            owned = set(state.input.assignment())
            offsets = state.ledger.to_commit(owned)
            resumed = {tp: off for tp, off in state.resume_commits.items() if tp in owned and tp not in offsets}
            offsets.update(resumed)
            offsets.update(self._settled_positions(owned, offsets))
        if not offsets:
            return
        if state.txn is not None:
            self._commit_transactions(offsets, resumed)
            return
        try:
            ok = state.input.commit(offsets)
        except Exception as exc:  # noqa: BLE001 - a failed commit is retried on the next round
            metrics.COMMITS.labels("error").inc()
            log.warning("offset commit failed, will retry: %s", exc)
            return
        metrics.COMMITS.labels("ok" if ok else "rebalanced").inc()
        with state.lock:
            state.ledger.committed(offsets)
            for tp in offsets:  # a refused commit after a rebalance is not retried: the next owner resumes
                state.resume_commits.pop(tp, None)
            if ok:
                state.committed.update(offsets)
        if ok and resumed:
            log.info("committed the positions the files end at (resume): %s",
                     ", ".join(f"{t}-{p}@{o}" for (t, p), o in sorted(resumed.items())))

    def _commit_transactions(self, offsets: dict[TP, int], resumed: dict[TP, int]) -> None:
        """Commit each partition's transaction (its dead letters, alerts and next offset); rewind failures."""
        state = self._state
        assert state.txn is not None
        failed = state.txn.commit(offsets)
        done = {tp: off for tp, off in offsets.items() if tp not in failed}
        if done:
            metrics.COMMITS.labels("ok").inc()
        with state.lock:
            state.ledger.committed(done)
            for tp in done:
                state.resume_commits.pop(tp, None)
            state.committed.update(done)
            for error in failed.values():
                metrics.COMMITS.labels("error").inc()
                self._on_txn_failed(error)
        resumed = {tp: off for tp, off in resumed.items() if tp in done}
        if resumed:
            log.info("committed the positions the files end at (resume): %s",
                     ", ".join(f"{t}-{p}@{o}" for (t, p), o in sorted(resumed.items())))

    def _settled_positions(self, owned: set[TP], offsets: dict[TP, int]) -> dict[TP, int]:
        """Positions to commit past offsets that hold no record (transaction markers, compacted gaps).

        A partition whose every accepted record is committed (so nothing of it
        is in flight, handled or durable-but-uncommitted: those are accepted
        and not committed yet) and whose consumer position is beyond the
        committed offset has only offsets without records of ours behind it;
        committing that position keeps the committed lag at 0 on an idle
        transactional topic. Caller holds the lock.
        """
        state = self._state
        if state.registry_paused:
            return {}
        out = {}
        for tp in owned:
            committed = state.committed.get(tp)
            if committed is None or tp in offsets or not state.ledger.settled(tp):
                continue
            pos = state.input.position(*tp)
            accepted = state.ledger.position(tp)
            # every record accepted is committed already, so what lies between is no record of ours
            if pos is not None and pos > committed and (accepted is None or accepted <= committed):
                out[tp] = pos
        return out
