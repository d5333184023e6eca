"""The stream job: Kafka -> decode -> classify -> Parquet + alerts -> commit.

Guarantees (see README "Delivery guarantees"):
- offsets are committed only after the Parquet files holding those rows,
  the dead letters and the alerts of the same records are durable;
- on partition assignment the job resumes after the last offset held by the
  finished files (file names carry offsets), skipping anything older, so a
  crash at any point yields no lost and no duplicate rows;
- bad records go to the dead-letter topic with a reason; the loop goes on.

Threading: rebalance callbacks run while the main loop is inside ``poll``
(on the polling thread with kafka-python 2.x, on its IO thread with 3.x);
callbacks and the loop share state under one re-entrant lock, and callbacks
never commit: the next owner resumes from the files instead.

Parts: :class:`StreamJob` is the coordinator that owns the loop and calls
parts with one job each, sharing what they must through one
:class:`~nlpstream.jobs.shared.SharedState` (the lock, the ledger, the
input, the sink, the batches in flight):

- jobs/wiring.py: builds the sink, DLQ, alert sinks, transactions, registry
  decoder and consumer settings from the config;
- jobs/ledger.py: the offset ledger (handled -> durable -> committed);
- jobs/batching.py: accepting, decoding, classifying and handling batches;
- jobs/checkpoint.py: ordered flush (DLQ, files, alerts durable), then commit;
- jobs/rebalance.py: assignment, revocation, loss and resume positions;
- jobs/liveness.py: heartbeat, watchdog, fetch-stall guard, idle timeout;
- jobs/registry_gate.py: schema ids fetched before records are accepted.

Backpressure and the lag gauges stay here, with the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from nlpstream.consumers.confluent_input import ConfluentInput
from nlpstream.consumers.kafka_input import KafkaInput
from nlpstream.inference import DeviceError, Engine
from nlpstream.jobs import metrics
from nlpstream.jobs.alerts import AlertRules
from nlpstream.jobs.batching import Batches
from nlpstream.jobs.checkpoint import Checkpoint
from nlpstream.jobs.config import StreamConfig
from nlpstream.jobs.gc_tuning import tuned_gc
from nlpstream.jobs.liveness import STALL_EXIT_CODE, Liveness
from nlpstream.jobs.rebalance import Rebalance, read_files_end
from nlpstream.jobs.registry_gate import RegistryGate
from nlpstream.jobs.shared import TP, SharedState, StreamSummary
from nlpstream.jobs.transactions import TransactionError
from nlpstream.jobs.wiring import (DEAD_LETTER_REASONS, Parts, build_sink, check_and_build_sink, connection_settings,
                                   engine_head_names, wire)

__all__ = ["DEAD_LETTER_REASONS", "DEVICE_EXIT_CODE", "STALL_EXIT_CODE", "StreamJob", "StreamSummary", "build_sink",
           "connection_settings", "engine_head_names", "run_stream"]

log = logging.getLogger(__name__)
DEVICE_EXIT_CODE = 69  # EX_UNAVAILABLE: no inference device answers any more; nothing was dead-lettered for it


class StreamJob:
    """One member of the consumer group. ``run()`` blocks until :meth:`stop` or a stop condition."""

    def __init__(self, config: StreamConfig, engine: Engine | None = None, hard_backstop: bool = False) -> None:
        if not config.kafka.topics:
            raise ValueError("kafka.topics is empty: give at least one --topic")
        self.config = config
        self._engine = engine
        self._owns_engine = engine is None
        self._stop = threading.Event()
        self._state = SharedState(config)  # the lock, the ledger, the input, the sink, the batches in flight
        self.summary = self._state.summary
        self.metrics_port: int | None = None
        self._rules = AlertRules(config.alerts)
        self._liveness = Liveness(self._state, hard_backstop)
        # built by run(), from the wiring's parts:
        self._sink: Any = None
        self._parts: Parts | None = None
        self._checkpoint: Checkpoint | None = None
        self._rebalance: Rebalance | None = None
        self._batches: Batches | None = None
        self._gate: RegistryGate | None = None  # schema'd input: ids fetched before a poll's records are accepted
        self._end_offsets: dict[TP, int] = {}  # read from the brokers while fetching is paused (lag stays true)
        self._next_end_read = 0.0

    # -- control --------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish its batch, flush, commit and return (signal-safe)."""
        self._stop.set()

    @property
    def _input(self) -> KafkaInput | ConfluentInput:
        """The current consumer (a fetch stall or a fence replaces it)."""
        return self._state.input

    # -- main loop --------------------------------------------------------------
    def run(self) -> StreamSummary:
        cfg = self.config
        state = self._state
        started = time.monotonic()
        # cheap checks first: a mistake costs one line, not a model load or a wait for Kafka
        self._sink = state.sink = check_and_build_sink(cfg, self._engine, self._rules)
        metrics.init_series(cfg.kafka.topics, DEAD_LETTER_REASONS)
        server = None
        if cfg.metrics.metrics_port is not None:
            server = metrics.start_metrics_server(cfg.metrics.metrics_host, cfg.metrics.metrics_port)
            self.metrics_port = int(server.server_address[1])
            log.info("metrics on http://%s:%d/metrics", cfg.metrics.metrics_host, self.metrics_port)
        looped = False  # until the consumer exists: a failure before frees the metrics port (see _stop_metrics)
        try:
            parts = self._parts = wire(cfg, self._engine)
        except BaseException:
            _stop_metrics(server)
            raise
        self._engine = parts.engine
        state.txn = parts.txn
        checkpoint = self._checkpoint = Checkpoint(state, parts.dlq, parts.alert_sinks, self._txn_failed,
                                                   background=cfg.output.background_flush)
        self._liveness.watch_flush(checkpoint.flushing_since)
        rebalance = self._rebalance = Rebalance(state, checkpoint, self._liveness, self._drain)
        batches = self._batches = Batches(state, parts.engine, parts.decode, self._rules, checkpoint,
                                          rebalance.rows_floor)
        if parts.registry is not None:
            self._gate = RegistryGate(state, parts.registry, self._liveness)
        liveness = self._liveness
        gc_settings = tuned_gc(cfg.gc_tuning)
        gc_settings.__enter__()  # after the model is loaded: it is frozen out of the collector's scans
        try:
            state.input = self._new_input()  # inside: a consumer that cannot be made still closes the parts
            looped = True
            last_flush = last_input = time.monotonic()
            liveness.heartbeat()
            liveness.start_watchdog()
            while not self._stop.is_set():
                liveness.heartbeat()
                polled_at = time.monotonic()
                records = state.input.poll(timeout_s=0.5, max_records=cfg.kafka.max_poll_records)
                now = time.monotonic()
                liveness.polled(now - polled_at)
                if state.fatal is not None:
                    raise state.fatal
                if state.txn is not None:
                    if rebalance.take_rebuild_wanted():  # fenced: another worker holds our partition; rejoin
                        self._rebuild_input()
                    rebalance.txn_housekeeping(now)
                if self._gate is not None:
                    records = self._gate.resolve(records, now)
                with state.lock:
                    accepted, seen = batches.accept(records)
                    if accepted:
                        batches.enqueue(accepted, seen)
                    batches.finish_ready()
                    if records:
                        last_input = time.monotonic()  # idle time starts when the batch is done
                        liveness.mark_progress(seen)
                    checkpoint.wait_if_behind(2 * cfg.output.max_buffered_rows)  # rather than pause fetching
                    checkpoint.reap()  # a flush beside the loop that finished: its offsets are durable now
                    due = (now - last_flush >= cfg.output.flush_interval or checkpoint.failing
                           or state.sink.buffered >= cfg.output.max_buffered_rows)
                    if due and checkpoint.has_pending():
                        if not checkpoint.flushing and checkpoint.retry_due(now):
                            if checkpoint.background:
                                checkpoint.start_flush()
                            else:
                                checkpoint.flush()
                            last_flush = now
                    elif due:
                        last_flush = now
                    self._apply_backpressure()
                checkpoint.commit()
                if rebalance.settle_due(now):
                    rebalance.settle_assigned(now)
                self._update_lag()
                if liveness.fetch_stalled(now):
                    self._rebuild_input()
                if cfg.max_messages is not None and self.summary.consumed + self.summary.skipped >= cfg.max_messages:
                    break
                if cfg.idle_timeout is not None:
                    idle_s = liveness.idle_for(now, last_input)
                    if idle_s >= cfg.idle_timeout and liveness.idle_confirmed(now, idle_s):
                        break
            self._final_flush()
        except DeviceError as exc:
            # No device is live: nothing of the batches in hand was written, dead-lettered or committed.
            # What earlier batches handled is made durable and committed; the rest is redelivered.
            log.error("no inference device is live (%s); stopping after making earlier batches durable, "
                      "without dead-lettering or committing the batches in hand", exc)
            state.in_flight.clear()
            self._final_flush()
            raise
        finally:
            gc_settings.__exit__(None, None, None)
            checkpoint.close()  # a flush in flight ends before its sinks close (still under the watchdog)
            liveness.finished()
            self._close()
            if not looped:
                _stop_metrics(server)
            self.summary.seconds = time.monotonic() - started
        return self.summary

    def _new_input(self) -> KafkaInput | ConfluentInput:
        """A consumer that joins the group (the client ``kafka.client`` names), with the rebalance part's callbacks."""
        assert self._parts is not None and self._rebalance is not None
        rebalance = self._rebalance
        client = ConfluentInput if self.config.kafka.client == "confluent" else KafkaInput
        return client(self._parts.conn, self._parts.settings, rebalance.on_assigned, rebalance.on_revoked,
                          rebalance.on_lost)

    def _rebuild_input(self) -> None:
        """Make what is in hand durable, commit it, leave the group and join again with a new consumer."""
        assert self._batches is not None and self._checkpoint is not None and self._rebalance is not None
        state, checkpoint = self._state, self._checkpoint
        with state.lock:
            checkpoint.wait()
            self._batches.drain()
            if checkpoint.has_pending() and not checkpoint.flush():
                for topic, partition in state.input.assignment():
                    checkpoint.discard(topic, partition)
        checkpoint.commit()
        old = state.input.assignment()
        state.input.close()
        with state.lock:
            self._rebalance.forget(old)
            state.paused = False
        state.input = self._new_input()

    def _final_flush(self) -> None:
        """Handle the batches in flight, flush what is in hand, retrying with backoff for a while; then commit."""
        assert self._batches is not None and self._checkpoint is not None and self._rebalance is not None
        with self._state.lock:
            self._batches.finish_all()
        self._checkpoint.flush_until_durable(self._liveness.heartbeat)
        if self._rebalance.unsettled():  # stopped before the resume positions were committed
            self._rebalance.settle_assigned(time.monotonic())
        self._checkpoint.commit()

    # -- seams between the parts (they call each other through the coordinator) -----------
    def _drain(self) -> None:
        """Handle every batch in flight (rebalance callbacks); a failure is kept for the loop to raise."""
        assert self._batches is not None
        self._batches.drain()

    def _txn_failed(self, error: TransactionError) -> None:
        """A partition's transaction is lost: the rebalance part rewinds it. Caller holds the lock."""
        assert self._rebalance is not None
        self._rebalance.txn_failed(error)

    def _heartbeat(self) -> None:
        """The main loop is alive (see :meth:`Liveness.heartbeat`)."""
        self._liveness.heartbeat()

    def _files_end(self, topic: str, partition: int) -> int | None:
        """Remove temporary files of the partition and read where its files end (retried with backoff)."""
        return read_files_end(self._sink, topic, partition, self._heartbeat)

    # -- backpressure and lag -------------------------------------------------------------
    def _apply_backpressure(self) -> None:
        """Pause fetching while rows wait for a failing sink; resume once they are down to half the limit.

        Only while flushes fail: a succeeding flush the loop got ahead of is waited for instead
        (:meth:`Checkpoint.wait_if_behind`), and a pause then would drop what the client prefetched
        (librdkafka's queue, fetched again after the resume: a stall of a second or more)."""
        state = self._state
        assert self._checkpoint is not None
        limit = self.config.output.max_buffered_rows * 2
        if not state.paused and state.sink.buffered >= limit and self._checkpoint.failing:
            state.input.pause(state.input.assignment())
            state.paused = True
            log.warning("pausing consumption: %d rows wait for the sink", state.sink.buffered)
        elif state.paused and state.sink.buffered < limit // 2:
            if not state.registry_paused:  # that pause ends with its own retry
                state.input.resume(state.resumable())
            state.paused = False
            self._liveness.mark_progress(state.input.assignment())  # paused time is no fetch stall

    def _update_lag(self) -> None:
        state = self._state
        assigned = state.input.assignment()
        now = time.monotonic()
        if (state.paused or state.registry_paused) and now >= self._next_end_read:
            # a paused partition is not fetched, so the client's end offsets stop moving: ask the brokers
            self._next_end_read = now + 10.0
            try:
                self._end_offsets = state.input.end_offsets(assigned, timeout_s=5.0)
            except Exception as exc:  # noqa: BLE001 - the poll path reports broker trouble
                log.debug("end offsets unavailable: %s", exc)
        elif not (state.paused or state.registry_paused):
            self._end_offsets.clear()
        for topic, partition in assigned:
            high = state.input.highwater(topic, partition)
            polled_end = self._end_offsets.get((topic, partition))
            if polled_end is not None:
                high = polled_end if high is None else max(high, polled_end)
            pos = state.ledger.position((topic, partition))
            if high is not None and pos is not None:
                metrics.CONSUMER_LAG.labels(topic, str(partition)).set(max(0, high - pos))
            committed = state.committed.get((topic, partition))
            if high is not None and committed is not None:
                metrics.COMMITTED_LAG.labels(topic, str(partition)).set(max(0, high - committed))

    def _close(self) -> None:
        assert self._parts is not None and self._batches is not None
        self._batches.close()
        parts = self._parts
        for closer in (
            self._state.input.close if self._state.input is not None else None,
            parts.dlq.close,
            parts.txn.close if parts.txn is not None else None,
            *(s.close for s in parts.alert_sinks),
            parts.alert_producer.close if parts.alert_producer else None,
            self._engine.close if self._owns_engine and self._engine is not None else None,
        ):
            if closer is None:
                continue
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 - closing must go on
                log.warning("error while closing: %s", exc)


def _stop_metrics(server: Any) -> None:
    """Stop /metrics of a job that never got to its loop, so a caller that fixes the cause can run it
    again in-process on the same port (once the job has run, /metrics stays up after run() returns,
    for a last scrape)."""
    if server is not None:
        server.shutdown()
        server.server_close()


def run_stream(config: StreamConfig, engine: Any = None) -> StreamSummary:
    """Run the stream job until stopped; convenience for the CLI and the demo."""
    return StreamJob(config, engine).run()
