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
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from nlpstream.consumers import DecodeError, DecodeSettings, InputRecord
from nlpstream.consumers.records import DecodedText
from nlpstream.consumers.client_config import (ConnectionSettings, connect_error, quiet_topic_creation,
                                                wait_for_kafka)
from nlpstream.consumers.errors import DECODE_KINDS, KafkaUnavailableError
from nlpstream.consumers.dlq import DeadLetterError, DeadLetterQueue
from nlpstream.consumers.kafka_input import ConsumerSettings, KafkaInput
from nlpstream.consumers.schema_registry import REGISTRY_FORMATS, RegistryDecoder, SchemaRegistryUnavailable
from nlpstream.inference import DeviceError, Engine, Prediction, load_engine
from nlpstream.inference.preflight import check_engine_options
from nlpstream.jobs import metrics
from nlpstream.jobs.alerts import AlertRules, LabeledMessage
from nlpstream.jobs.config import OutputConfig, StreamConfig
from nlpstream.jobs.handling import decode_batch, decode_failure, inference_failure, output_row
from nlpstream.jobs.ledger import OffsetLedger
from nlpstream.jobs.transactions import PartitionTransactions, TransactionError, resume_point
from nlpstream.sinks import (AlertSink, DeltaSink, FileAlertSink, IcebergSink, KafkaAlertSink, OutputRow, ParquetSink, SinkError,
                             WebhookAlertSink, check_output)

log = logging.getLogger(__name__)
TP = tuple[str, int]
_MAX_BACKOFF_S = 30.0
STALL_EXIT_CODE = 75  # EX_TEMPFAIL: restart me
DEAD_LETTER_REASONS = (*DECODE_KINDS, "inference")  # the ``reason`` label of nlpstream_messages_dead_lettered_total
DEVICE_EXIT_CODE = 69  # EX_UNAVAILABLE: no inference device answers any more; nothing was dead-lettered for it


@dataclass
class StreamSummary:
    """What one run of the stream job did."""

    consumed: int = 0
    labeled: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    alerts: int = 0
    files: list[str] = field(default_factory=list)
    labels: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def throughput(self) -> float:
        return self.labeled / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Batch:
    """One micro-batch between decoding and being handled: its classification may still be running."""

    records: list[InputRecord]
    good: list[DecodedText]
    undecodable: list[tuple[InputRecord, DecodeError]]
    results: Future[list[Prediction | BaseException]]  # already done when classified on the loop's thread


def connection_settings(config: StreamConfig) -> ConnectionSettings:
    """Connection settings for kafka-python clients, secrets resolved at the last moment."""
    k = config.kafka
    return ConnectionSettings(
        bootstrap_servers=k.bootstrap_servers,
        security_protocol=k.security_protocol,
        sasl_mechanism=k.sasl_mechanism,
        sasl_username=k.sasl_username,
        sasl_password=k.password(),
        ssl_cafile=k.ssl_cafile,
        ssl_certfile=k.ssl_certfile,
        ssl_keyfile=k.ssl_keyfile,
        ssl_password=k.key_password(),
    )


def build_sink(output: OutputConfig, heads: Sequence[str] = ()) -> Any:
    """The row sink of ``output.format``; a table sink checks its table (or catalog) first (SinkError)."""
    if output.format == "delta":  # storage_options here are delta-rs's (object_store keys, e.g. AWS_ENDPOINT_URL)
        sink: Any = DeltaSink(output.output, output.include_text, heads, storage_options=output.storage_options)
    elif output.format == "iceberg":
        sink = IcebergSink(output.iceberg.catalog, output.iceberg.table or "", output.include_text, heads)
    else:
        return ParquetSink(output.output, output.include_text, output.compression,
                           storage_options=output.storage_options, skip_written=output.skip_written)
    sink.check()
    return sink


def engine_head_names(engine: Any, model: str) -> list[str]:
    """The heads' names, first the main one: from a loaded engine, else read from the model spec."""
    if engine is not None:
        heads = getattr(engine, "heads", None)
        return [name for name, _ in heads] if heads else [""]
    from nlpstream.inference.heads import head_names

    return head_names(model)


class StreamJob:
    """One member of the consumer group. ``run()`` blocks until :meth:`stop` or a stop condition."""

    def __init__(self, config: StreamConfig, engine: Engine | None = None, hard_backstop: bool = False) -> None:
        if not config.kafka.topics:
            raise ValueError("kafka.topics is empty: give at least one --topic")
        self.config = config
        self._engine = engine
        self._owns_engine = engine is None
        self._stop = threading.Event()
        self._done = threading.Event()  # run() returned: the watchdog stops
        self._hard_backstop = hard_backstop  # also arm faulthandler's GIL-free timer (the process is ours)
        self._armed_at = -1e9
        self._lock = threading.RLock()
        self._decode = DecodeSettings(config.input.input_format, config.input.text_field, config.input.id_field)
        self._ledger = OffsetLedger()  # handled -> durable -> committed per partition
        self._in_flight: deque[_Batch] = deque()  # decoded, classification submitted, not yet handled (in order)
        self._classifier: ThreadPoolExecutor | None = None
        self._fatal: BaseException | None = None  # raised in a rebalance callback (the client swallows those)
        self._buffered_rows: list[tuple[str, int, int, str]] = []  # (topic, partition, event ms, label) not yet durable
        self._dlq_pending: list[tuple[str, str]] = []  # (topic, reason)
        self._alerts_pending = 0
        self.summary = StreamSummary()
        self.metrics_port: int | None = None
        self._rules = AlertRules(config.alerts)
        self._paused = False
        self._flush_failing_since: float | None = None  # monotonic start of a sink outage (one WARNING each)
        # schema'd input: ids are fetched before a poll's records are accepted; an outage puts them back
        self._registry: RegistryDecoder | None = None
        self._registry_down_since: float | None = None
        self._registry_retry_at = 0.0
        self._registry_backoff = 0.0
        self._registry_paused = False
        # fetch-stall guard, on a clock that only runs inside poll (a long batch is no stall):
        self._poll_clock = 0.0  # seconds spent in poll so far
        self._progress: dict[TP, float] = {}  # poll clock when each partition was assigned or last gave a record
        self._next_fetch_check = 0.0
        self._assigned_at: dict[TP, float] = {}  # monotonic time of each partition's assignment (idle timeout)
        # committed offsets, for the committed-lag gauge and the resume commit (network reads: main loop only)
        self._resume_at: dict[TP, int | None] = {}  # assigned, committed offset not read yet: where the files end
        self._committed: dict[TP, int] = {}  # the group's committed offset (or, before any commit, where we started)
        self._resume_commits: dict[TP, int] = {}  # where the files end, ahead of the group's commit: _commit sends it
        self._next_committed_read = 0.0
        self._settle_failing_since: float | None = None
        self._settle_warned = False
        self._end_offsets: dict[TP, int] = {}  # read from the brokers while fetching is paused (lag stays true)
        self._next_end_read = 0.0
        # kafka.transactions: dead letters, Kafka alerts and offsets in one transaction per input partition
        self._txn: PartitionTransactions | None = None
        self._pending: dict[TP, float] = {}  # assigned or rewound, paused: not fenced / committed offset unread
        self._next_prepare = 0.0
        self._prepare_backoff = 0.0
        self._rows_floor: dict[TP, int] = {}  # where the files end: records below are re-handled without rows
        self._rebuild_wanted = False  # fenced: another worker holds our partition; leave the group and rejoin

    # -- control --------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish its batch, flush, commit and return (signal-safe)."""
        self._stop.set()

    # -- main loop --------------------------------------------------------------
    def run(self) -> StreamSummary:
        cfg = self.config
        started = time.monotonic()
        # cheap checks first: a mistake costs one line, not a model load or a wait for Kafka
        if cfg.output.format != "iceberg":  # an iceberg table lives in its catalog, checked with the sink
            check_output(cfg.output.output, cfg.output.storage_options)
        if self._engine is None:
            check_engine_options(**cfg.model.engine_options())
        head_names = engine_head_names(self._engine, cfg.model.model)
        self._rules.check_heads(head_names)
        self._sink = build_sink(cfg.output, head_names[1:])  # a table's columns and catalog checked here
        metrics.init_series(cfg.kafka.topics, DEAD_LETTER_REASONS)
        if cfg.metrics.metrics_port is not None:
            self.metrics_port = metrics.serve_metrics(cfg.metrics.metrics_host, cfg.metrics.metrics_port)
            log.info("metrics on http://%s:%d/metrics", cfg.metrics.metrics_host, self.metrics_port)
        if cfg.input.input_format in REGISTRY_FORMATS:
            sr = cfg.input.schema_registry
            self._registry = RegistryDecoder(cfg.input.input_format, sr.url or "", sr.username, sr.secret(),
                                             sr.ca_file)
            metrics.SCHEMA_REGISTRY_OUTAGE.set(0)
            self._decode = DecodeSettings(cfg.input.input_format, cfg.input.text_field, cfg.input.id_field,
                                          registry=self._registry)
        conn = connection_settings(cfg)
        quiet_topic_creation([cfg.dlq_topic(), cfg.alerts.alert_topic])
        wait_for_kafka(conn, cfg.kafka.startup_timeout, log)
        if self._engine is None:
            self._engine = load_engine(**cfg.model.engine_options())
        self._dlq = DeadLetterQueue(conn, cfg.dlq_topic())
        self._alert_sinks: list[AlertSink] = []
        self._alert_producer = None
        if cfg.alerts.alert_file:
            self._alert_sinks.append(FileAlertSink(cfg.alerts.alert_file))
        if cfg.alerts.alert_webhook_url:
            token = cfg.alerts.alert_webhook_token
            auth = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
            self._alert_sinks.append(WebhookAlertSink(cfg.alerts.alert_webhook_url, headers=auth))
        if cfg.kafka.transactions:
            prefix = cfg.kafka.transactional_id_prefix or f"nlpstream-{cfg.kafka.group_id}"
            self._txn = PartitionTransactions(conn, prefix, cfg.kafka.group_id, cfg.dlq_topic(), cfg.alerts.alert_topic)
        if cfg.alerts.alert_topic and self._txn is None:
            from kafka import KafkaProducer
            from kafka.errors import KafkaError

            try:
                self._alert_producer = KafkaProducer(**conn.kafka_kwargs(), acks="all")
            except (KafkaError, OSError) as exc:
                raise KafkaUnavailableError(f"alert producer: {connect_error(conn, exc)}") from exc
            self._alert_sinks.append(KafkaAlertSink(self._alert_producer, cfg.alerts.alert_topic))
        settings = ConsumerSettings(
            topics=tuple(cfg.kafka.topics), group_id=cfg.kafka.group_id,
            auto_offset_reset=cfg.kafka.auto_offset_reset, max_poll_records=cfg.kafka.max_poll_records,
            max_poll_interval_ms=cfg.kafka.max_poll_interval_ms, session_timeout_ms=cfg.kafka.session_timeout_ms,
            group_instance_id=cfg.kafka.group_instance_id,
        )
        self._settings, self._conn = settings, conn
        if cfg.pipeline_depth > 0:
            self._classifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nlpstream-classify")
        self._input = KafkaInput(conn, settings, self._on_assigned, self._on_revoked, self._on_lost)
        last_flush = last_input = time.monotonic()
        backoff = 0.0
        next_flush_try = 0.0
        self._heartbeat()
        threading.Thread(target=self._watchdog, name="nlpstream-watchdog", daemon=True).start()
        try:
            while not self._stop.is_set():
                self._heartbeat()
                polled_at = time.monotonic()
                records = self._input.poll(timeout_s=0.5, max_records=cfg.kafka.max_poll_records)
                now = time.monotonic()
                self._poll_clock += now - polled_at
                if self._fatal is not None:
                    raise self._fatal
                if self._txn is not None:
                    self._txn_housekeeping(now)
                if self._registry is not None:
                    records = self._resolve_schemas(records, now)
                with self._lock:
                    accepted, seen = self._accept_batch(records)
                    if accepted:
                        self._enqueue(accepted)
                    self._finish_ready()
                    if records:
                        last_input = time.monotonic()  # idle time starts when the batch is done
                        for tp in seen:
                            self._progress[tp] = self._poll_clock
                    due = (now - last_flush >= cfg.output.flush_interval
                           or self._sink.buffered >= cfg.output.max_buffered_rows)
                    if due and now >= next_flush_try and self._has_pending():
                        if self._flush():
                            last_flush, backoff = now, 0.0
                        else:
                            backoff = min(_MAX_BACKOFF_S, max(0.5, backoff * 2))
                            next_flush_try = now + backoff
                    elif due and not self._has_pending():
                        last_flush = now
                    self._apply_backpressure()
                self._commit()
                if self._resume_at and now >= self._next_committed_read:
                    self._settle_assigned(now)
                self._update_lag()
                if now >= self._next_fetch_check:
                    self._next_fetch_check = now + min(5.0, cfg.kafka.fetch_stall_timeout / 4)
                    self._check_fetch_progress()
                if cfg.max_messages is not None and self.summary.consumed + self.summary.skipped >= cfg.max_messages:
                    break
                if cfg.idle_timeout is not None and self._idle_for(now, last_input) >= cfg.idle_timeout:
                    break
            self._final_flush()
        except DeviceError as exc:
            # No device is live: nothing of the batches in hand was written, dead-lettered or committed.
            # What earlier batches handled is made durable and committed; the rest is redelivered.
            log.error("no inference device is live (%s); stopping after making earlier batches durable, "
                      "without dead-lettering or committing the batches in hand", exc)
            self._in_flight.clear()
            self._final_flush()
            raise
        finally:
            self._done.set()
            if self._hard_backstop:
                faulthandler.cancel_dump_traceback_later()
            self._close()
            self.summary.seconds = time.monotonic() - started
        return self.summary

    def _resolve_schemas(self, records: list[InputRecord], now: float) -> list[InputRecord]:
        """Fetch the schema ids of a poll not seen yet; during a registry outage put the records back.

        A registry that does not answer is no fault of the records: nothing
        of them is accepted, dead-lettered or committed; their partitions
        are sought back to the first of them and paused, and fetching
        resumes after a backoff (0.5 s doubling to ``retry_max_s``), when the
        ids are asked for again. One WARNING per outage, one INFO when it ends.
        """
        assert self._registry is not None
        if self._registry_paused and now >= self._registry_retry_at:
            self._registry_paused = False
            if not self._paused:
                self._input.resume(self._resumable())
                for tp in self._input.assignment():  # paused time is no fetch stall
                    self._progress[tp] = self._poll_clock
        if not records:
            return records
        ids = self._registry.unresolved(r.value for r in records)
        if ids and self._registry_down_since is not None and now < self._registry_retry_at:
            self._put_back(records)  # e.g. a partition assigned during the outage: wait for the next try
            return []
        if ids:
            try:
                self._registry.resolve(ids)
            except SchemaRegistryUnavailable as exc:
                metrics.SCHEMA_REGISTRY_ERRORS.inc()
                metrics.SCHEMA_REGISTRY_OUTAGE.set(1)
                if self._registry_down_since is None:
                    self._registry_down_since = now
                    log.warning("%s; records with new schema ids wait (nothing of them is committed or "
                                "dead-lettered), retrying with backoff", exc)
                else:
                    log.debug("schema registry still down: %s", exc)
                self._registry_backoff = min(self.config.input.schema_registry.retry_max_s,
                                             max(0.5, self._registry_backoff * 2))
                self._registry_retry_at = now + self._registry_backoff
                self._put_back(records)
                return []
            if self._registry_down_since is not None:  # it answered: the outage is over
                log.info("the schema registry answers again after %.0fs", now - self._registry_down_since)
                self._registry_down_since = None
                self._registry_backoff = 0.0
                metrics.SCHEMA_REGISTRY_OUTAGE.set(0)
        return records

    def _put_back(self, records: list[InputRecord]) -> None:
        """Seek each partition of ``records`` back to its first record and pause fetching until the retry."""
        first: dict[TP, int] = {}
        for r in records:
            first.setdefault((r.topic, r.partition), r.offset)
        with self._lock:
            owned = set(self._input.assignment())
            for (topic, partition), offset in first.items():
                if (topic, partition) in owned:
                    self._input.seek(topic, partition, offset)
            self._input.pause(owned)
            self._registry_paused = True

    def _idle_for(self, now: float, last_input: float) -> float:
        """Seconds without input since the last record or assignment; 0 while a partition is known to hold more.

        (The client learns a partition's end offset only from fetch responses,
        which an incremental fetch session skips for partitions with nothing
        new, so an unknown end offset does not hold the timer back.)
        """
        assigned = self._input.assignment()
        if not assigned or self._in_flight:
            return 0.0
        for topic, partition in assigned:
            high = self._input.highwater(topic, partition)
            pos = self._input.position(topic, partition)
            if pos is None or (high is not None and pos < high):
                return 0.0
        assigned_at = max(self._assigned_at.get(tp, 0.0) for tp in assigned)
        return now - max(last_input, assigned_at)

    def _check_fetch_progress(self) -> None:
        """Rebuild the consumer when an assigned partition has records it does not fetch.

        A partition counts as stalled when it gave no record during
        ``kafka.fetch_stall_timeout`` seconds spent polling (time spent
        classifying or flushing does not count) since its assignment while the
        broker's end offset is past the consumer's position. This guards
        against client-side fetch stalls (kafka-python sends no new fetch to a
        broker while one is unanswered, and gives up on it only after
        request_timeout_ms, 305 s by default): what is durable is committed,
        the consumer leaves the group and a fresh one joins; the files resume
        logic makes the replay exact.
        """
        limit, now = self.config.kafka.fetch_stall_timeout, self._poll_clock
        if self._paused or self._registry_paused:
            return
        quiet = [tp for tp in self._input.assignment()
                 if tp not in self._pending and now - self._progress.setdefault(tp, now) >= limit]
        if not quiet:
            return
        try:
            ends = self._input.end_offsets(quiet)
        except Exception as exc:  # noqa: BLE001 - broker trouble: the poll path reports and retries it
            log.debug("end offsets unavailable: %s", exc)
            for tp in quiet:  # an unreachable broker is no client stall: start the period again
                self._progress[tp] = now
            return
        stalled = {}
        for tp in quiet:
            pos = self._input.position(*tp)
            if (pos is None and ends.get(tp, 0) > 0) or (pos is not None and ends.get(tp, pos) > pos):
                stalled[tp] = (pos, ends.get(tp))
            else:
                self._progress[tp] = now  # caught up: look again after another full period
        if not stalled:
            return
        metrics.FETCH_STALLS.inc()
        log.warning("no record for %.0fs from partitions that hold more (position, end offset): %s; client state: %s;"
                    " rebuilding the consumer", limit,
                    ", ".join(f"{t}-{p} {v}" for (t, p), v in sorted(stalled.items())), self._input.fetch_state())
        self._rebuild_input()

    def _rebuild_input(self) -> None:
        """Make what is in hand durable, commit it, leave the group and join again with a new consumer."""
        with self._lock:
            self._drain()
            if self._has_pending() and not self._flush():
                for topic, partition in self._input.assignment():
                    self._discard(topic, partition)
        self._commit()
        old = self._input.assignment()
        self._input.close()
        with self._lock:
            self._forget(old)
            self._paused = False
        self._input = KafkaInput(self._conn, self._settings, self._on_assigned, self._on_revoked, self._on_lost)

    def _heartbeat(self) -> None:
        """The main loop is alive: note it for the watchdog, re-arm the hard backstop now and then."""
        self._beat = time.monotonic()
        if self._hard_backstop and self._beat - self._armed_at >= 5.0:
            # A thread that deadlocks while holding the GIL also stops the Python watchdog;
            # faulthandler's timer runs without the GIL: it dumps every stack and exits with 1.
            faulthandler.dump_traceback_later(self.config.stall_timeout + 30.0, exit=True)
            self._armed_at = self._beat

    def _watchdog(self) -> None:
        """Exit with code 75 (and every thread's stack in the log) when a loop round stalls."""
        limit = self.config.stall_timeout
        while not self._done.wait(min(5.0, limit / 4)):
            stalled = time.monotonic() - self._beat
            if stalled > limit:
                log.error("main loop stalled for %.0fs (limit %.0fs); dumping stacks and exiting with 75", stalled, limit)
                faulthandler.dump_traceback(all_threads=True)
                sys.stderr.flush()
                os._exit(STALL_EXIT_CODE)

    def _final_flush(self) -> None:
        """Handle the batches in flight, flush what is in hand, retrying with backoff for a while; then commit."""
        with self._lock:
            self._finish_all()
        deadline = time.monotonic() + 60.0
        delay = 0.5
        while True:
            self._heartbeat()
            with self._lock:
                if not self._has_pending() or self._flush():
                    break
            if time.monotonic() >= deadline:
                log.error("final flush failed for 60s; uncommitted records will be redelivered")
                break
            time.sleep(delay)
            delay = min(_MAX_BACKOFF_S, delay * 2)
        if self._resume_at:  # stopped before the resume positions were committed
            self._settle_assigned(time.monotonic())
        self._commit()

    # -- per batch ----------------------------------------------------------------
    def _accept_batch(self, records: list[InputRecord]) -> tuple[list[InputRecord], list[TP]]:
        """The records not yet handled nor in the files, and the partitions seen; per partition run, not per record.

        Records of one partition come in ascending offsets, so what the ledger
        skips is a prefix of each run; metrics and the summary move once per topic.
        """
        if self._pending:  # not fenced yet or rewinding: fetched again once prepared
            records = [r for r in records if (r.topic, r.partition) not in self._pending]
        accepted: list[InputRecord] = []
        consumed: Counter[str] = Counter()
        skipped: Counter[str] = Counter()
        seen: list[TP] = []
        start = 0
        while start < len(records):
            first = records[start]
            tp = (first.topic, first.partition)
            end = start + 1
            while end < len(records) and records[end].partition == first.partition and records[end].topic == first.topic:
                end += 1
            run = records[start:end]
            skip = self._ledger.accept_run(tp, [r.offset for r in run])
            accepted.extend(run[skip:] if skip else run)
            consumed[tp[0]] += len(run) - skip
            skipped[tp[0]] += skip
            seen.append(tp)
            start = end
        for topic, n in consumed.items():
            if n:
                metrics.CONSUMED.labels(topic).inc(n)
        for topic, n in skipped.items():
            if n:
                metrics.SKIPPED.labels(topic).inc(n)
        self.summary.consumed += sum(consumed.values())
        self.summary.skipped += sum(skipped.values())
        return accepted, seen

    def _enqueue(self, records: list[InputRecord]) -> None:
        """Decode a micro-batch and start its classification; handle the oldest batches beyond the pipeline depth.

        With ``pipeline_depth`` N, up to N batches are classified on the
        worker thread while this thread polls, decodes and writes; batches are
        handled strictly in order, so offsets become handled in order too.
        Caller holds the lock.
        """
        good, undecodable = decode_batch(records, self._decode)
        texts = [d.text for d in good]
        if good and self._classifier is not None:
            results = self._classifier.submit(self._classify_batch, texts)
        else:
            results = Future()
            results.set_result(self._classify_batch(texts) if good else [])
        self._in_flight.append(_Batch(records, good, undecodable, results))
        while len(self._in_flight) > self.config.pipeline_depth:
            self._finish(self._in_flight.popleft())

    def _finish_ready(self) -> None:
        """Handle, in order, the batches whose classification is done (never waits)."""
        while self._in_flight and self._in_flight[0].results.done():
            self._finish(self._in_flight.popleft())

    def _drain(self) -> None:
        """Handle every batch in flight, waiting for their classification (rebalance, rebuild).

        Called inside rebalance callbacks, whose exceptions the client only
        logs: a failure is kept in ``_fatal`` (the loop raises it after poll),
        and the batches not handled are dropped (never committed, so redelivered).
        """
        try:
            self._finish_all()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the loop
            self._in_flight.clear()
            self._fatal = exc

    def _finish_all(self) -> None:
        """Handle every batch in flight, in order, waiting for their classification."""
        while self._in_flight:
            self._finish(self._in_flight.popleft())

    def _finish(self, batch: _Batch) -> None:
        """Buffer rows and alerts and send dead letters of one classified batch; then mark its records handled.

        Classification ran before any dead letter of the batch is sent, so a
        DeviceError (no device live) leaves nothing of this batch behind.
        """
        records, good, undecodable = batch.records, batch.good, batch.undecodable
        results = batch.results.result()
        if self._pending:  # a partition rewound while this batch was in flight: handled again after the rewind
            keep = [i for i, d in enumerate(good) if (d.record.topic, d.record.partition) not in self._pending]
            good, results = [good[i] for i in keep], [results[i] for i in keep]
            undecodable = [(r, e) for r, e in undecodable if (r.topic, r.partition) not in self._pending]
            records = [r for r in records if (r.topic, r.partition) not in self._pending]
        for record, exc in undecodable:
            self._dead_letter(record, *decode_failure(exc))
        if good:
            assert self._engine is not None
            processed_at = int(time.time() * 1000)
            rows: list[OutputRow] = []
            labeled: list[LabeledMessage] = []
            key_fields = [f.strip() for f in (self.config.alerts.window_key_field or "").split(",") if f.strip()]
            for decoded, result in zip(good, results):
                rec = decoded.record
                if isinstance(result, BaseException):
                    self._dead_letter(rec, *inference_failure(result))
                    continue
                row = output_row(decoded, result, processed_at, self._engine.model_name)
                event_ms = row.event_time_ms
                floor = self._rows_floor.get((rec.topic, rec.partition))
                if floor is None or rec.offset >= floor:  # below: the files hold its row; alerts are sent again
                    rows.append(row)
                key = next((decoded.fields[f] for f in key_fields if f in decoded.fields), None) if key_fields else None
                heads = {name: (label, score) for name, label, score in row.heads}
                labeled.append(LabeledMessage(rec.topic, rec.partition, rec.offset, decoded.id, result.label,
                                              result.score, event_ms, None if key is None else str(key), heads))
            self._sink.write(rows)
            self._buffered_rows.extend((r.topic, r.partition, r.event_time_ms, r.label) for r in rows)
            alerts = self._rules.evaluate(labeled)
            for alert in alerts:
                metrics.ALERTED.labels(alert.kind).inc()
            for sink in self._alert_sinks:
                sink.write(alerts)
            if self._txn is not None:
                self._txn.send_alerts(alerts)
            self._alerts_pending += len(alerts)
        last: dict[TP, int] = {}
        for record in records:  # ascending per partition: the last one is the highest
            last[(record.topic, record.partition)] = record.offset
        for tp, offset in last.items():
            self._ledger.handled(tp, offset)

    def _classify_batch(self, texts: list[str]) -> list[Prediction | BaseException]:
        metrics.BATCH_TEXTS.observe(len(texts))
        start = time.perf_counter()
        results = self._classify_isolating(texts)
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - start)
        return results

    def _classify_isolating(self, texts: list[str]) -> list[Prediction | BaseException]:
        """Classify; only texts that fail alone get an exception in their place (they are dead-lettered).

        With the project's engine (``classify_each``) the engine itself tells a
        transient fault (retried), a bad text (failed alone on healthy devices:
        a TextError in its place) and a gone device apart; anything it raises
        (DeviceError, or a bug) is no property of the texts and propagates: the
        job stops without committing the batch in hand. A stand-in engine that
        only offers ``classify`` is bisected here, DeviceError still propagating.
        """
        assert self._engine is not None
        counted = getattr(self._engine, "classify_counted", None)
        if counted is not None:  # token counts come back with the results (no shared attribute to race on)
            results, tokens = counted(texts)
            metrics.BATCH_TOKENS.observe(tokens)
            return list(results)
        each = getattr(self._engine, "classify_each", None)
        if each is not None:
            return list(each(texts))
        return self._bisect(texts)

    def _bisect(self, texts: list[str]) -> list[Prediction | BaseException]:
        assert self._engine is not None
        try:
            return list(self._engine.classify(texts))
        except DeviceError:
            raise
        except Exception as exc:  # noqa: BLE001 - isolate the texts that make the model raise
            if len(texts) == 1:
                return [exc]
            half = len(texts) // 2
            return self._bisect(texts[:half]) + self._bisect(texts[half:])

    def _dead_letter(self, record: InputRecord, error_class: str, message: str, reason: str) -> None:
        if self._txn is not None:
            self._txn.send_dead_letter(record, error_class, message)
        else:
            self._dlq.send(record, error_class, message)
        self._dlq_pending.append((record.topic, reason))

    def _has_pending(self) -> bool:
        return self._ledger.has_pending()

    def _flush(self) -> bool:
        """Make everything handled durable (DLQ, files, alerts); True on success. Caller holds the lock."""
        try:
            self._dlq.flush()
            lost = self._txn.flush() if self._txn is not None else {}
            for error in lost.values():  # that partition's records are handled again from the committed offset
                self._txn_failed(error)
            files = self._sink.flush()
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
        self.summary.labels.update(row[3] for row in rows)
        for topic, n in Counter(row[0] for row in rows).items():
            metrics.LABELED.labels(topic).inc(n)
        metrics.observe_many(metrics.END_TO_END_SECONDS, [max(0.0, (now_ms - row[2]) / 1000) for row in rows])
        for topic, reason in self._dlq_pending:
            metrics.DEAD_LETTERED.labels(topic, reason).inc()
        self.summary.labeled += len(self._buffered_rows)
        self.summary.dead_lettered += len(self._dlq_pending)
        self.summary.alerts += self._alerts_pending
        self.summary.files.extend(f.path for f in files)
        self._buffered_rows.clear()
        self._dlq_pending.clear()
        self._alerts_pending = 0
        self._ledger.made_durable()
        return True

    def _commit(self) -> None:
        with self._lock:
            owned = set(self._input.assignment())
            offsets = self._ledger.to_commit(owned)
            resumed = {tp: off for tp, off in self._resume_commits.items() if tp in owned and tp not in offsets}
            offsets.update(resumed)
            offsets.update(self._settled_positions(owned, offsets))
        if not offsets:
            return
        if self._txn is not None:
            self._commit_transactions(offsets, resumed)
            return
        try:
            ok = self._input.commit(offsets)
        except Exception as exc:  # noqa: BLE001 - a failed commit is retried on the next round
            metrics.COMMITS.labels("error").inc()
            log.warning("offset commit failed, will retry: %s", exc)
            return
        metrics.COMMITS.labels("ok" if ok else "rebalanced").inc()
        with self._lock:
            self._ledger.committed(offsets)
            for tp in offsets:  # a refused commit after a rebalance is not retried: the next owner resumes
                self._resume_commits.pop(tp, None)
            if ok:
                self._committed.update(offsets)
        if ok and resumed:
            log.info("committed the positions the files end at (resume): %s",
                     ", ".join(f"{t}-{p}@{o}" for (t, p), o in sorted(resumed.items())))

    # -- kafka.transactions (see jobs/transactions.py) ---------------------------------------
    def _resumable(self) -> list[TP]:
        """The assigned partitions that may fetch: not those waiting to be prepared (transactions)."""
        return [tp for tp in self._input.assignment() if tp not in self._pending]

    def _commit_transactions(self, offsets: dict[TP, int], resumed: dict[TP, int]) -> None:
        """Commit each partition's transaction (its dead letters, alerts and next offset); rewind failures."""
        assert self._txn is not None
        failed = self._txn.commit(offsets)
        done = {tp: off for tp, off in offsets.items() if tp not in failed}
        if done:
            metrics.COMMITS.labels("ok").inc()
        with self._lock:
            self._ledger.committed(done)
            for tp in done:
                self._resume_commits.pop(tp, None)
            self._committed.update(done)
            for error in failed.values():
                metrics.COMMITS.labels("error").inc()
                self._txn_failed(error)
        resumed = {tp: off for tp, off in resumed.items() if tp in done}
        if resumed:
            log.info("committed the positions the files end at (resume): %s",
                     ", ".join(f"{t}-{p}@{o}" for (t, p), o in sorted(resumed.items())))

    def _txn_failed(self, error: TransactionError) -> None:
        """A partition's transaction is lost or its outcome unknown: handle the partition again from the
        group's committed offset, with a new producer (whose fence ends that transaction). Caller holds the lock.

        Fenced means another worker holds the partition now (we were evicted):
        leave the group and join again rather than fence it back.
        """
        assert self._txn is not None
        tp = error.tp
        self._txn.retire([tp])
        if error.fenced:
            log.warning("transactions of %s-%d fenced by another worker (this one was evicted?); dropping what "
                        "is in hand and rejoining the group: %s", tp[0], tp[1], error)
            self._rebuild_wanted = True
        else:
            log.warning("transaction of %s-%d failed; handling it again from the committed offset: %s",
                        tp[0], tp[1], error)
        if tp in set(self._input.assignment()):
            self._discard(*tp)
            self._ledger.assigned(tp, None)
            self._committed.pop(tp, None)
            self._resume_commits.pop(tp, None)
            self._pending[tp] = time.monotonic()
            self._input.pause([tp])

    def _assigned_transactional(self, tp: TP) -> None:
        """A newly assigned partition waits, paused, until :meth:`_prepare` fenced its id. Caller holds the lock."""
        self._ledger.assigned(tp, None)  # nothing is accepted before the prepare (see _accept_batch)
        self._committed.pop(tp, None)
        self._pending[tp] = time.monotonic()
        self._next_prepare = 0.0
        self._prepare_backoff = 0.0
        self._input.pause([tp])
        self._progress[tp] = self._poll_clock
        self._assigned_at[tp] = time.monotonic()

    def _txn_housekeeping(self, now: float) -> None:
        """Main loop: prepare waiting partitions, close retired producers, rejoin after a fence."""
        assert self._txn is not None
        if self._rebuild_wanted:
            self._rebuild_wanted = False
            self._rebuild_input()
        if self._pending and now >= self._next_prepare:
            for tp in list(self._pending):
                if not self._prepare(tp):
                    self._prepare_backoff = min(_MAX_BACKOFF_S, max(0.5, self._prepare_backoff * 2))
                    self._next_prepare = now + self._prepare_backoff
                    break
            else:
                self._prepare_backoff = 0.0
        self._txn.reap()

    def _prepare(self, tp: TP) -> bool:
        """Fence ``tp``'s transactional id, then read its committed offset and resume there.

        Records between the committed offset and the end of the files are
        handled again: their dead letters and alerts go in the new
        transaction (whatever an earlier one sent was aborted by the fence or
        is committed with that offset), their rows are not written again.
        Without a committed offset the job starts at the log start with
        ``auto_offset_reset=earliest`` (a first transaction may have been lost
        after its files were written: everything below the files' end is
        handled again, without rows), else where the files end (committing
        that position) or, with no files, at the end of the log.
        False when the brokers did not answer (retried with backoff).
        """
        assert self._txn is not None
        try:
            self._txn.open(tp)
            group = self._input.committed_offsets([tp]).get(tp)
            reset: dict[TP, int] = {}
            if group is None:
                reset = (self._input.beginning_offsets([tp]) if self.config.kafka.auto_offset_reset == "earliest"
                         else self._input.end_offsets([tp]))
        except Exception as exc:  # noqa: BLE001 - broker trouble: the poll path reports it; try again later
            log.warning("cannot prepare %s-%d for transactions yet (retrying): %s", tp[0], tp[1], exc)
            self._txn.retire([tp])
            return False
        with self._lock:
            if tp not in self._pending or tp not in set(self._input.assignment()):
                self._txn.retire([tp])  # revoked meanwhile
                return True
            try:
                last = self._sink.last_offset(*tp)
            except SinkError as exc:  # an object store briefly unreachable: tried again with backoff
                log.warning("cannot read where %s-%d's files end yet (retrying): %s", tp[0], tp[1], exc)
                self._txn.retire([tp])
                return False
            files_end = None if last is None else last + 1
            earliest = self.config.kafka.auto_offset_reset == "earliest"
            start, commit_start = resume_point(group, files_end, reset.get(tp) if earliest else None, earliest)
            if commit_start and start is not None:
                self._resume_commits[tp] = start  # committed by a transaction of its own
            if files_end is not None:
                self._rows_floor[tp] = files_end
            else:
                self._rows_floor.pop(tp, None)
            self._ledger.assigned(tp, start)
            if start is not None:
                self._input.seek(tp[0], tp[1], start)
            known = group if group is not None else reset.get(tp)
            if known is not None:
                self._committed[tp] = known
            del self._pending[tp]
            if not (self._paused or self._registry_paused):
                self._input.resume([tp])
            self._progress[tp] = self._poll_clock
        log.info("assigned %s-%d (transactional): committed offset %s, files end at %s, resuming at %s",
                 tp[0], tp[1], group, None if files_end is None else files_end - 1, start)
        return True

    def _settled_positions(self, owned: set[TP], offsets: dict[TP, int]) -> dict[TP, int]:
        """Positions to commit past offsets that hold no record (transaction markers, compacted gaps).

        A partition whose every accepted record is committed (so nothing of it
        is in flight, handled or durable-but-uncommitted: those are accepted
        and not committed yet) and whose consumer position is beyond the
        committed offset has only offsets without records of ours behind it;
        committing that position keeps the committed lag at 0 on an idle
        transactional topic. Caller holds the lock.
        """
        if self._registry_paused:
            return {}
        out = {}
        for tp in owned:
            committed = self._committed.get(tp)
            if committed is None or tp in offsets or not self._ledger.settled(tp):
                continue
            pos = self._input.position(*tp)
            accepted = self._ledger.position(tp)
            # every record accepted is committed already, so what lies between is no record of ours
            if pos is not None and pos > committed and (accepted is None or accepted <= committed):
                out[tp] = pos
        return out

    def _settle_assigned(self, now: float) -> None:
        """Read the group's committed offsets of newly assigned partitions; where the files are ahead, have
        :meth:`_commit` commit where they end.

        After a resume from files (a reset group, a new group over the same
        output) the job seeks past what the files hold; committing that
        position at once keeps the group's committed lag true even when no new
        record arrives. Before a partition's first commit, committed lag is
        measured from where consumption starts (the log start offset with
        ``auto_offset_reset=earliest``, else the end offset now). Failed reads
        are retried a few seconds later, failed commits by :meth:`_commit`.
        """
        with self._lock:
            waiting = dict(self._resume_at)
        try:
            found = self._input.committed_offsets(waiting)
            no_commit = [tp for tp in waiting if found.get(tp) is None and waiting[tp] is None]
            starts: dict[TP, int] = {}
            if no_commit:
                reset = self._input.beginning_offsets if self.config.kafka.auto_offset_reset == "earliest" \
                    else self._input.end_offsets
                starts = reset(no_commit)
            resumed = [tp for tp, resume in waiting.items() if resume is not None]
            ends = self._input.end_offsets(resumed) if resumed else {}
        except Exception as exc:  # noqa: BLE001 - broker trouble: the poll path reports it; read again later
            if self._settle_failing_since is None:
                self._settle_failing_since = now
            elif now - self._settle_failing_since >= 60.0 and not self._settle_warned:
                self._settle_warned = True
                log.warning("the group's committed offsets could not be read for %.0fs (committed lag unknown, "
                            "resume positions not committed yet); still trying: %s", now - self._settle_failing_since,
                            exc)
            log.debug("committed offsets unavailable: %s", exc)
            self._next_committed_read = now + 5.0
            return
        self._settle_failing_since, self._settle_warned = None, False
        with self._lock:
            owned = set(self._input.assignment())
            for tp, resume in waiting.items():
                if tp not in owned or self._resume_at.get(tp, -1) != resume:
                    continue  # revoked or reassigned meanwhile: the next assignment reads again
                del self._resume_at[tp]
                group = found.get(tp)
                known = max(-1 if group is None else group, self._committed.get(tp, -1))
                if resume is not None and resume > ends.get(tp, resume):
                    log.warning("the files of %s-%d end at offset %d but the partition ends at %d (was the topic "
                                "recreated?); not committing past its end", tp[0], tp[1], resume - 1, ends[tp])
                    resume = None
                if resume is not None and resume > known:
                    self._resume_commits[tp] = resume  # sent by _commit, retried there until it lands
                elif known >= 0:
                    self._committed[tp] = known
                elif tp in starts:
                    self._committed[tp] = starts[tp]

    def _apply_backpressure(self) -> None:
        limit = self.config.output.max_buffered_rows * 2
        if not self._paused and self._sink.buffered >= limit:
            self._input.pause(self._input.assignment())
            self._paused = True
            log.warning("pausing consumption: %d rows wait for the sink", self._sink.buffered)
        elif self._paused and self._sink.buffered < limit // 2:
            if not self._registry_paused:  # that pause ends with its own retry
                self._input.resume(self._resumable())
            self._paused = False
            for tp in self._input.assignment():  # paused time is no fetch stall
                self._progress[tp] = self._poll_clock

    def _update_lag(self) -> None:
        assigned = self._input.assignment()
        now = time.monotonic()
        if (self._paused or self._registry_paused) and now >= self._next_end_read:
            # a paused partition is not fetched, so the client's end offsets stop moving: ask the brokers
            self._next_end_read = now + 10.0
            try:
                self._end_offsets = self._input.end_offsets(assigned, timeout_s=5.0)
            except Exception as exc:  # noqa: BLE001 - the poll path reports broker trouble
                log.debug("end offsets unavailable: %s", exc)
        elif not (self._paused or self._registry_paused):
            self._end_offsets.clear()
        for topic, partition in assigned:
            high = self._input.highwater(topic, partition)
            polled_end = self._end_offsets.get((topic, partition))
            if polled_end is not None:
                high = polled_end if high is None else max(high, polled_end)
            pos = self._ledger.position((topic, partition))
            if high is not None and pos is not None:
                metrics.CONSUMER_LAG.labels(topic, str(partition)).set(max(0, high - pos))
            committed = self._committed.get((topic, partition))
            if high is not None and committed is not None:
                metrics.COMMITTED_LAG.labels(topic, str(partition)).set(max(0, high - committed))

    # -- rebalance callbacks (kafka-python IO thread, main loop inside poll) ---------
    def _on_assigned(self, partitions: list[TP]) -> None:
        with self._lock:
            self._drain()
            for topic, partition in partitions:
                tp = (topic, partition)
                try:
                    last = self._files_end(topic, partition)
                except SinkError as exc:  # the client swallows callback errors: the loop raises it after poll
                    self._fatal = exc
                    return
                if self._txn is not None:
                    self._assigned_transactional(tp)  # where the files end is read again once its id is fenced
                    continue
                self._ledger.assigned(tp, None if last is None else last + 1)
                self._resume_at[tp] = None if last is None else last + 1
                self._committed.pop(tp, None)
                self._next_committed_read = 0.0
                if last is not None:
                    self._input.seek(topic, partition, last + 1)
                self._progress[tp] = self._poll_clock
                self._assigned_at[tp] = time.monotonic()
                if self._registry_paused:  # a registry outage: new partitions wait for the next try too
                    self._input.pause([tp])
                log.info("assigned %s-%d, files end at %s", topic, partition, last)

    def _files_end(self, topic: str, partition: int) -> int | None:
        """Remove temporary files of the partition and read where its files end (retried with backoff).

        An object store may be briefly unreachable: tries for up to a minute, beating the watchdog
        between tries, then raises the SinkError (the job stops with one error line).
        """
        deadline = time.monotonic() + 60.0
        delay = 0.5
        while True:
            try:
                self._sink.remove_temp_files(topic, partition)
                return self._sink.last_offset(topic, partition)
            except SinkError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("cannot read where %s-%d's files end, retrying in %.1fs: %s", topic, partition, delay, exc)
            self._heartbeat()
            time.sleep(delay)
            delay = min(_MAX_BACKOFF_S, delay * 2)

    def _on_revoked(self, partitions: list[TP]) -> None:
        with self._lock:
            self._drain()  # what was polled before the rebalance is handled and flushed with the rest
            if self._has_pending() and not self._flush():
                for topic, partition in partitions:
                    self._discard(topic, partition)
            self._forget(partitions)

    def _on_lost(self, partitions: list[TP]) -> None:
        with self._lock:
            self._drain()
            for topic, partition in partitions:
                self._discard(topic, partition)
            self._forget(partitions)

    def _discard(self, topic: str, partition: int) -> None:
        dropped = self._sink.discard(topic, partition)
        self._ledger.discard((topic, partition))
        self._buffered_rows = [row for row in self._buffered_rows if (row[0], row[1]) != (topic, partition)]
        if dropped:
            log.info("dropped %d rows of %s-%d that were not durable yet; they will be redelivered",
                     dropped, topic, partition)

    def _forget(self, partitions: list[TP]) -> None:
        if self._txn is not None:
            self._txn.retire(partitions)  # their open transactions are aborted: the next owner redoes them
        for topic, partition in partitions:
            tp = (topic, partition)
            self._ledger.forget([tp])
            self._progress.pop(tp, None)
            self._assigned_at.pop(tp, None)
            self._resume_at.pop(tp, None)
            self._resume_commits.pop(tp, None)
            self._committed.pop(tp, None)
            self._pending.pop(tp, None)
            self._rows_floor.pop(tp, None)
            for gauge in (metrics.CONSUMER_LAG, metrics.COMMITTED_LAG):
                try:
                    gauge.remove(topic, str(partition))
                except KeyError:
                    pass

    def _close(self) -> None:
        if self._classifier is not None:
            self._classifier.shutdown(wait=False, cancel_futures=True)
        for closer in (
            getattr(self, "_input", None) and self._input.close,
            getattr(self, "_dlq", None) and self._dlq.close,
            self._txn.close if self._txn is not None else None,
            *(s.close for s in getattr(self, "_alert_sinks", [])),
            self._alert_producer.close if getattr(self, "_alert_producer", None) else None,
            self._engine.close if self._owns_engine and self._engine is not None else None,
        ):
            if closer is None:
                continue
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 - closing must go on
                log.warning("error while closing: %s", exc)


def run_stream(config: StreamConfig, engine: Any = None) -> StreamSummary:
    """Run the stream job until stopped; convenience for the CLI and the demo."""
    return StreamJob(config, engine).run()
