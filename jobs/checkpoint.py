"""The checkpoint of the stream job: ordered flush (dead letters, files, alerts durable), then commit.

Offsets are committed only after the Parquet files (or table commit)
holding those rows, the dead letters and the alerts of the same records
are durable: a flush makes what is handled durable, in that order, and
only then moves the ledger's offsets of those records to durable;
:meth:`Checkpoint.commit` commits durable offsets of the partitions still
owned (plain consumer commit, or one Kafka transaction per input partition
with ``kafka.transactions``, see jobs/transactions.py). Rebalance callbacks
flush but never commit: the next owner resumes from the files instead.

A flush can run beside the loop (``output.background_flush``, the default
without transactions): :meth:`Checkpoint.start_flush` *seals* what is
handled so far (the ledger's offsets, the sinks' rows, dead letters and
alerts) and hands the sealed part to a writer thread, while the loop goes
on polling, classifying and buffering newer records; :meth:`Checkpoint.reap`
takes the result on the loop: only the sealed offsets become durable. One
flush is in flight at a time; a failed one stays sealed and is sealed again
with the newer records on the next try. Everything that must see the sinks
at rest (the synchronous :meth:`Checkpoint.flush`, :meth:`Checkpoint.discard`,
the rebalance callbacks, closing) first waits for the flush in flight
(:meth:`Checkpoint.wait`). The writer thread never takes the job's lock, so
waiting for it under the lock cannot deadlock. With transactions every flush
is synchronous (the producers' transactions follow the loop).

The dead letters, rows and alerts of handled records are written through
this part, which counts them until they are durable (then they reach the
summary and the metrics).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nlpstream.consumers import InputRecord
from nlpstream.consumers.dlq import DeadLetterError, DeadLetterQueue
from nlpstream.jobs import metrics
from nlpstream.jobs.shared import LOGGER_NAME, MAX_BACKOFF_S, TP, SharedState
from nlpstream.jobs.transactions import TransactionError
from nlpstream.sinks import AlertSink, SinkError
from nlpstream.sinks.chunks import without

log = logging.getLogger(LOGGER_NAME)


@dataclass
class _Handled:
    """Rows, dead letters and alerts of handled records, counted once they are durable."""

    rows: list[Any] = field(default_factory=list)  # Arrow chunks of rows (nlpstream.sinks.chunks)
    dead_letters: list[tuple[str, str]] = field(default_factory=list)  # (topic, reason)
    alerts: int = 0

    def add(self, other: "_Handled") -> None:
        self.rows.extend(other.rows)
        self.dead_letters.extend(other.dead_letters)
        self.alerts += other.alerts

    def drop(self, topic: str, partition: int) -> None:
        self.rows = without(self.rows, topic, partition)

    @property
    def row_count(self) -> int:
        return sum(chunk.num_rows for chunk in self.rows)


@dataclass
class _Written:
    """What a flush made durable, tallied on the thread that flushed (the loop only adds the tallies up)."""

    files: list[Any]
    labels: Counter[str]
    per_topic: Counter[str]
    latencies: Any  # seconds from each row's event time to now, an array


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    counts = pc.value_counts(column)
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))


class Checkpoint:
    """What is handled but not durable yet, the flush that makes it durable and the commit after it.

    ``on_txn_failed`` is called (lock held) for each partition whose
    transaction is lost: that partition is handled again from the group's
    committed offset (see :meth:`jobs.rebalance.Rebalance.txn_failed`).
    ``background``: flushes may run on a writer thread (:meth:`start_flush`);
    it is ignored with transactions.
    """

    def __init__(self, state: SharedState, dlq: DeadLetterQueue, alert_sinks: Sequence[AlertSink],
                 on_txn_failed: Callable[[TransactionError], None], background: bool = False) -> None:
        self._state = state
        self._dlq = dlq
        self._alert_sinks = list(alert_sinks)
        self._on_txn_failed = on_txn_failed
        self._open = _Handled()  # handled since the last seal
        self._sealed: _Handled | None = None  # set aside for the flush in flight, or the one that failed
        self._in_flight: Future[_Written] | None = None
        self._in_flight_since: float | None = None
        self._writer: ThreadPoolExecutor | None = None
        self.background = background and state.txn is None
        self._flush_failing_since: float | None = None  # monotonic start of a sink outage (one WARNING each)
        self._backoff = 0.0  # after a failed flush: seconds until the next try (doubling), and when that is
        self._next_try = 0.0

    # -- handled, not durable yet (caller holds the lock) -----------------------------------
    def dead_letter(self, record: InputRecord, error_class: str, message: str, reason: str) -> None:
        if self._state.txn is not None:
            self._state.txn.send_dead_letter(record, error_class, message)
        else:
            self._dlq.send(record, error_class, message)
        self._open.dead_letters.append((record.topic, reason))

    def write_chunk(self, chunk: Any) -> None:
        """Buffer an Arrow chunk of rows (:func:`nlpstream.sinks.chunks.columns_chunk`)."""
        if chunk.num_rows:
            self._state.sink.write_chunk(chunk)
            self._open.rows.append(chunk)

    def write_alerts(self, alerts: Sequence[Any]) -> None:
        for alert in alerts:
            metrics.ALERTED.labels(alert.kind).inc()
        for sink in self._alert_sinks:
            sink.write(alerts)
        if self._state.txn is not None:
            self._state.txn.send_alerts(alerts)
        self._open.alerts += len(alerts)

    def has_pending(self) -> bool:
        """True while something handled (in a flush in flight or not) is not durable yet."""
        return self._state.ledger.has_pending()

    def discard(self, topic: str, partition: int) -> None:
        """Drop what of the partition is handled but not durable (it will be redelivered). Caller holds the lock.

        A flush in flight is waited for first: what it made durable stays durable.
        """
        state = self._state
        self.wait()
        dropped = state.sink.discard(topic, partition)
        state.ledger.discard((topic, partition))
        self._open.drop(topic, partition)
        if self._sealed is not None:
            self._sealed.drop(topic, partition)
        if dropped:
            log.info("dropped %d rows of %s-%d that were not durable yet; they will be redelivered",
                     dropped, topic, partition)

    # -- flush ------------------------------------------------------------------------------------
    @property
    def flushing(self) -> bool:
        """True while a flush runs on the writer thread."""
        return self._in_flight is not None

    @property
    def failing(self) -> bool:
        """True when the last flush failed and its part waits, sealed, for the next try."""
        return self._in_flight is None and self._sealed is not None

    def retry_due(self, now: float) -> bool:
        """False while a failed flush's backoff runs (it doubles per failure, up to 30 s)."""
        return now >= self._next_try

    def flushing_since(self) -> float | None:
        """Monotonic time the flush in flight started, while it runs (the watchdog's view), or None."""
        future, since = self._in_flight, self._in_flight_since
        return None if future is None or future.done() else since

    def flush(self) -> bool:
        """Make everything handled durable (DLQ, files, alerts) on this thread; True on success. Caller holds the lock.

        A flush in flight is waited for first."""
        self.wait()
        self._seal()
        try:
            written = self._write_sealed(in_loop=True)
        except (DeadLetterError, SinkError) as exc:
            self._failed(exc)
            return False
        self._done(written)
        return True

    def start_flush(self) -> bool:
        """Seal what is handled and make it durable on the writer thread; False when a flush is already in
        flight (:meth:`reap` takes its result). Caller holds the lock."""
        if self._in_flight is not None:
            return False
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="nlpstream-flush")
        self._seal()
        self._in_flight_since = time.monotonic()
        self._in_flight = self._writer.submit(self._write_sealed, False)
        return True

    def reap(self) -> bool | None:
        """The outcome of a flush in flight that has finished: True (its records are durable now), False
        (it failed: they stay sealed for the next try); None while it runs or when none was started.
        Caller holds the lock."""
        if self._in_flight is None or not self._in_flight.done():
            return None
        return self._take()

    def wait(self) -> bool | None:
        """Wait for the flush in flight, if any, and take its outcome (see :meth:`reap`). Caller holds the lock."""
        if self._in_flight is None:
            return None
        return self._take()

    def wait_if_behind(self, limit: int) -> bool:
        """Wait for the flush in flight when ``limit`` rows or more are not durable (the writer thread is behind
        the loop); True when it waited. Backpressure then pauses fetching only while flushes fail: a pause
        drops the client's prefetched records (librdkafka's), fetched again after the resume. Caller holds the lock."""
        if self._in_flight is None or self._state.sink.buffered < limit:
            return False
        self.wait()
        return True

    def close(self) -> None:
        """Wait for a flush in flight (its outcome is dropped: nothing is committed after this) and stop
        the writer thread."""
        if self._in_flight is not None:
            try:
                self._in_flight.result()
            except Exception as exc:  # noqa: BLE001 - closing goes on; nothing of it is committed
                log.warning("a flush in flight when the job stopped failed: %s", exc)
            self._in_flight = self._in_flight_since = None
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def _take(self) -> bool:
        future = self._in_flight
        assert future is not None
        try:
            written = future.result()
        except (DeadLetterError, SinkError) as exc:
            self._failed(exc)
            return False
        except BaseException as exc:
            # not a storage outage (a bug, an Arrow error, memory): the job stops. Kept for the loop too, since a
            # rebalance callback that waited here is cut short and the client swallows what it raises.
            if self._state.fatal is None:
                self._state.fatal = exc
            raise
        finally:
            self._in_flight = self._in_flight_since = None
        self._done(written)
        return True

    def _seal(self) -> None:
        """What is handled so far goes to the next flush, with what a failed one left sealed. Caller holds the
        lock; no flush is in flight."""
        state = self._state
        if self._sealed is None:
            self._sealed = self._open
        else:
            self._sealed.add(self._open)
        self._open = _Handled()
        state.ledger.seal()
        self._dlq.seal()
        state.sink.seal()
        for sink in self._alert_sinks:
            sink.seal()

    def _write_sealed(self, in_loop: bool) -> _Written:
        """Make the sealed part durable: dead letters, (transactions,) files, alerts. Runs on the writer thread
        unless ``in_loop``; it then touches only the sealed part of each sink, never the job's lock."""
        state = self._state
        self._dlq.flush_sealed()
        if in_loop and state.txn is not None:
            lost = state.txn.flush()
            for error in lost.values():  # that partition's records are handled again from the committed offset
                self._on_txn_failed(error)
        files = state.sink.flush_sealed()
        for sink in self._alert_sinks:
            sink.flush_sealed()
        sealed = self._sealed
        assert sealed is not None
        now_ms = time.time() * 1000
        labels: Counter[str] = Counter()
        per_topic: Counter[str] = Counter()
        latencies = []
        for chunk in sealed.rows:
            labels.update(_value_counts(chunk["label"]))
            per_topic.update(_value_counts(chunk["topic"]))
            latencies.append(np.maximum(0.0, (now_ms - chunk["event_time"].to_numpy().astype(np.float64)) / 1000))
        return _Written(files, labels, per_topic, np.concatenate(latencies) if latencies else np.zeros(0))

    def _failed(self, exc: BaseException) -> None:
        metrics.SINK_RETRIES.inc()
        self._backoff = min(MAX_BACKOFF_S, max(0.5, self._backoff * 2))
        self._next_try = time.monotonic() + self._backoff
        if self._flush_failing_since is None:  # one WARNING per outage, the retries at DEBUG
            self._flush_failing_since = time.monotonic()
            log.warning("flush failed, retrying with backoff and committing nothing until it succeeds: %s", exc)
        else:
            log.debug("flush failed again: %s", exc)

    def _done(self, written: _Written) -> None:
        """The sealed part is durable: count it, and its offsets may be committed. Caller holds the lock."""
        state = self._state
        if self._flush_failing_since is not None:
            log.info("flush succeeded again after %.0fs of failures", time.monotonic() - self._flush_failing_since)
            self._flush_failing_since = None
        self._backoff, self._next_try = 0.0, 0.0
        sealed = self._sealed
        assert sealed is not None
        summary = state.summary
        summary.labels.update(written.labels)
        for topic, n in written.per_topic.items():
            metrics.LABELED.labels(topic).inc(n)
        metrics.observe_many(metrics.END_TO_END_SECONDS, written.latencies)
        for topic, reason in sealed.dead_letters:
            metrics.DEAD_LETTERED.labels(topic, reason).inc()
        summary.labeled += sealed.row_count
        summary.dead_lettered += len(sealed.dead_letters)
        summary.alerts += sealed.alerts
        summary.files.extend(f.path for f in written.files)
        self._sealed = None
        state.ledger.made_durable()

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
