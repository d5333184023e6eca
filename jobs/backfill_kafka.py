"""Kafka replay backfill: label exactly the records of one topic whose timestamps fall in ``[from, to)``.

:meth:`KafkaBackfill.plan` reaches the brokers, maps the time range to a
fixed offset range per partition (see :mod:`consumers.replay`) and cleans up
what a killed run left; :meth:`KafkaBackfill.run` reads those ranges with a
group-less consumer and handles them in pieces of up to ``rows_per_file``
records per partition, exactly as the stream job handles a micro-batch
(:mod:`jobs.handling`: the same decoding, DLQ headers and output rows). A
piece is committed in order: its dead letters acknowledged, its row files
durable, its marker written (:mod:`backfill_output`); a rerun resumes each
partition after its finished pieces. Records inside the offset range whose
timestamp is outside ``[from, to)`` (producer-set CreateTime out of order)
are not labeled.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import pyarrow as pa

from nlpstream.consumers import DecodeSettings, InputRecord
from nlpstream.consumers.client_config import quiet_topic_creation, wait_for_kafka
from nlpstream.consumers.dlq import DeadLetterQueue
from nlpstream.consumers.errors import ConsumerError
from nlpstream.consumers.replay import KafkaReplay, PartitionRange
from nlpstream.consumers.schema_registry import REGISTRY_FORMATS, RegistryDecoder, SchemaRegistryUnavailable
from nlpstream.jobs import metrics
from nlpstream.jobs.backfill import (CLASSIFY_CHUNK, REJECT_REASONS, BackfillSummary, PieceResult, Tracker,
                                     _classify_each)
from nlpstream.jobs.backfill_inputs import BackfillError
from nlpstream.jobs.backfill_output import BackfillOutput, Range, next_undone
from nlpstream.jobs.config import BackfillConfig
from nlpstream.jobs.gc_tuning import tuned_gc
from nlpstream.jobs.handling import decode_columns, decode_failure, inference_failure, labeled_columns, split_failed
from nlpstream.jobs.stream import connection_settings

log = logging.getLogger(__name__)


def _iso(ms: int | None) -> str:
    from datetime import datetime, timezone

    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat()


class KafkaBackfill:
    """One replay of ``topic`` over ``[from_ms, to_ms)`` (None: from the log start / up to the end now)."""

    def __init__(self, config: BackfillConfig, topic: str, from_ms: int | None, to_ms: int | None) -> None:
        if from_ms is not None and to_ms is not None and from_ms >= to_ms:
            raise BackfillError(f"--from-time ({_iso(from_ms)}) must be before --to-time ({_iso(to_ms)})")
        self.config, self.topic, self.from_ms, self.to_ms = config, topic, from_ms, to_ms
        self._replay: KafkaReplay | None = None
        self._ranges: list[PartitionRange] = []
        self._positions: dict[int, int] = {}
        self.already_done = 0

    def plan(self) -> int:
        """Reach the brokers, fix the offset ranges and the resume positions; returns the offsets to read.

        Raises BackfillError: brokers unreachable, topic unknown, or no record in the time range.
        """
        cfg = self.config
        conn = connection_settings(cfg)
        try:
            wait_for_kafka(conn, cfg.kafka.startup_timeout, log)
            self._replay = KafkaReplay(conn, self.topic, timeout_s=30.0, max_poll_records=cfg.kafka.max_poll_records)
            self._ranges = self._replay.ranges(self.from_ms, self.to_ms)
        except ConsumerError as exc:
            raise BackfillError(str(exc)) from exc
        if not any(r.size for r in self._ranges):
            raise BackfillError(f"topic {self.topic!r} holds no record with a timestamp in "
                                f"[{_iso(self.from_ms)}, {_iso(self.to_ms)})")
        self._out = BackfillOutput(cfg.output.output, cfg.output.include_text, cfg.output.compression,
                                   storage_options=cfg.output.storage_options)
        todo = 0
        for r in self._ranges:
            done: list[Range] = self._out.prepare(self.topic, r.partition)
            self._positions[r.partition] = min(r.stop, next_undone(done, r.start))
            self.already_done += self._positions[r.partition] - r.start
            todo += r.stop - self._positions[r.partition]
        metrics.init_series([self.topic], REJECT_REASONS)
        log.info("replaying %s [%s, %s): %s", self.topic, _iso(self.from_ms), _iso(self.to_ms),
                 ", ".join(f"{r.partition}:{r.start}..{r.stop} (resume at {self._positions[r.partition]})"
                           for r in self._ranges))
        return todo

    def run(self, engine: Any, progress: Any = None) -> BackfillSummary:
        """Read, label and commit every planned range; returns the summary. Call :meth:`plan` first."""
        assert self._replay is not None, "plan() first"
        cfg = self.config
        summary = BackfillSummary(already_done=self.already_done)
        started = time.monotonic()
        stops = {r.partition: r.stop for r in self._ranges}
        tracker = Tracker(progress, sum(stops[p] - pos for p, pos in self._positions.items()))
        registry = None
        if cfg.input.input_format in REGISTRY_FORMATS:
            sr = cfg.input.schema_registry
            registry = RegistryDecoder(cfg.input.input_format, sr.url or "", sr.username, sr.secret(), sr.ca_file)
        # no other fields kept: the backfill writes rows only (and its batches then decode as columns)
        self._decode = DecodeSettings(cfg.input.input_format, cfg.text_field, cfg.id_field, registry=registry,
                                      keep_fields=())
        quiet_topic_creation([cfg.dlq_topic()])
        try:
            self._dlq = DeadLetterQueue(connection_settings(cfg), cfg.dlq_topic())
        except ConsumerError as exc:
            raise BackfillError(str(exc)) from exc
        replay = self._replay
        replay.assign(self._positions, stops)
        first = {p: pos for p, pos in self._positions.items() if pos < stops[p]}
        buffers: dict[int, list[InputRecord]] = {p: [] for p in first}
        last_progress = time.monotonic()
        with tuned_gc(cfg.gc_tuning):  # as in the stream job: no full scans of what start-up loaded
            try:
                while first:
                    records = replay.poll(0.5)
                    for record in records:
                        buffers[record.partition].append(record)
                    if records:
                        metrics.CONSUMED.labels(self.topic).inc(len(records))
                        last_progress = time.monotonic()
                    for p in list(first):
                        finished = replay.finished(p)
                        buf = buffers[p]
                        if len(buf) >= cfg.rows_per_file:
                            piece, buffers[p] = buf[:cfg.rows_per_file], buf[cfg.rows_per_file:]
                            last = piece[-1].offset
                        elif finished:
                            piece, buffers[p], last = buf, [], stops[p] - 1
                        else:
                            continue
                        summary.add(self._piece(p, first[p], last, piece, engine, tracker))
                        last_progress = time.monotonic()
                        first[p] = last + 1
                        if first[p] >= stops[p]:
                            del first[p]
                    if first and time.monotonic() - last_progress > cfg.kafka.fetch_stall_timeout:
                        raise BackfillError(f"no record from {self.topic} for {cfg.kafka.fetch_stall_timeout:.0f}s "
                                            f"while partitions {sorted(first)} hold more (kafka.fetch_stall_timeout); "
                                            "rerun to resume")
            finally:
                replay.close()
                try:
                    self._dlq.close()
                except Exception as exc:  # noqa: BLE001 - closing must go on; unacked dead letters: piece unfinished
                    log.warning("closing the dead-letter producer: %s", exc)
        summary.seconds = time.monotonic() - started
        return summary

    def _in_range(self, record: InputRecord) -> bool:
        ts = record.timestamp_ms
        return (self.from_ms is None or ts >= self.from_ms) and (self.to_ms is None or ts < self.to_ms)

    def _resolve(self, records: list[InputRecord]) -> None:
        """Fetch the schemas the records name; retried with backoff, then BackfillError."""
        registry = self._decode.registry
        if registry is None:
            return
        delay, deadline = 0.5, time.monotonic() + self.config.input.schema_registry.retry_max_s * 4
        while True:
            try:
                registry.resolve(registry.unresolved(r.value for r in records))
                return
            except SchemaRegistryUnavailable as exc:
                metrics.SCHEMA_REGISTRY_ERRORS.inc()
                if time.monotonic() >= deadline:
                    raise BackfillError(f"{exc}; rerun to resume") from exc
                log.warning("%s; retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.config.input.schema_registry.retry_max_s)

    def _piece(self, partition: int, first: int, last: int, records: list[InputRecord], engine: Any,
               tracker: Tracker) -> PieceResult:
        """Handle offsets ``first``..``last`` of a partition (``records`` are those that exist) and commit."""
        wanted = [r for r in records if self._in_range(r)]
        self._resolve(wanted)
        good, undecodable = decode_columns(wanted, self._decode)
        result = PieceResult(self.topic)
        dead: Counter[str] = Counter()
        for record, exc in undecodable:
            error_class, message, reason = decode_failure(exc)
            self._dlq.send(record, error_class, message)
            dead[reason] += 1
        tracker.advance(len(undecodable))
        chunks, labels, rows = [], Counter[str](), 0
        for start in range(0, len(good), CLASSIFY_CHUNK):
            part = good.select(list(range(start, min(start + CLASSIFY_CHUNK, len(good)))))
            now_ms = int(time.time() * 1000)
            failed, part, results = split_failed(part, _classify_each(engine, part.texts))
            for record, exc in failed:
                error_class, message, reason = inference_failure(exc)
                self._dlq.send(record, error_class, message)
                dead[reason] += 1
            tracker.advance(len(failed) + len(part))
            if len(part):
                columns = labeled_columns(part, results, now_ms, engine.model_name, one_topic=True)
                chunks.append(columns.chunk)
                labels.update(columns.labels)
                rows += len(part)
        tracker.advance((last - first + 1) - len(wanted))  # offsets without a record, or outside the time range
        try:
            self._dlq.flush()
        except ConsumerError as exc:
            raise BackfillError(f"{exc}; rerun to resume") from exc
        result.rows, result.dead_lettered = rows, dict(dead)
        result.labels = dict(labels)
        files = self._out.commit(self.topic, partition, first, last, pa.concat_tables(chunks) if chunks else [], [],
                                 {"rows": rows, "dead_lettered": sum(dead.values()),
                                  "outside_time_range": len(records) - len(wanted)})
        result.files = [f.path for f in files]
        return result
