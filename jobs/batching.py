"""Batching and classification of the stream job: accept, decode, classify (pipelined) and handle in order.

A poll's records are accepted against the offset ledger (what the files or
this session already hold is skipped), decoded, and classified on a worker
thread with ``pipeline_depth`` > 0; batches are handled strictly in order,
so offsets become handled in order too. Handling a batch writes its rows,
alerts and dead letters through the checkpoint (jobs/checkpoint.py), which
makes them durable before anything is committed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from nlpstream.consumers import DecodeSettings, InputRecord
from nlpstream.inference import DeviceError, Prediction
from nlpstream.jobs import metrics
from nlpstream.jobs.alerts import AlertRules, LabeledMessage
from nlpstream.jobs.checkpoint import Checkpoint
from nlpstream.jobs.handling import DecodedBatch, decode_columns, decode_failure, inference_failure, labeled_columns, split_failed
from nlpstream.jobs.shared import TP, Batch, SharedState
from nlpstream.jobs.wiring import alert_key_fields


class Batches:
    """The micro-batches between a poll and the checkpoint: the in-flight ones are ``state.in_flight``.

    ``rows_floor(tp)``: where the files of ``tp`` end when its records are
    handled again (transactions); records below get no row, their alerts are
    sent again.
    """

    def __init__(self, state: SharedState, engine: Any, decode: DecodeSettings, rules: AlertRules,
                 checkpoint: Checkpoint, rows_floor: Callable[[TP], int | None]) -> None:
        self._state = state
        self.config = state.config
        self._engine = engine
        self._decode = decode
        self._rules = rules
        self._checkpoint = checkpoint
        self._rows_floor = rows_floor
        self._key_fields = alert_key_fields(self.config)
        self._classifier: ThreadPoolExecutor | None = None
        if self.config.pipeline_depth > 0:
            self._classifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nlpstream-classify")

    def close(self) -> None:
        if self._classifier is not None:
            self._classifier.shutdown(wait=False, cancel_futures=True)

    # -- per batch ----------------------------------------------------------------
    def accept(self, records: list[InputRecord]) -> tuple[list[InputRecord], list[TP]]:
        """The records not yet handled nor in the files, and the partitions seen; per partition run, not per record.

        Records of one partition come in ascending offsets, so what the ledger
        skips is a prefix of each run; metrics and the summary move once per topic.
        """
        state = self._state
        if state.pending:  # not fenced yet or rewinding: fetched again once prepared
            records = [r for r in records if (r.topic, r.partition) not in state.pending]
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
            skip = state.ledger.accept_run(tp, [r.offset for r in run])
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
        state.summary.consumed += sum(consumed.values())
        state.summary.skipped += sum(skipped.values())
        return accepted, seen

    def enqueue(self, records: list[InputRecord], partitions: list[TP] | None = None) -> None:
        """Decode a micro-batch and start its classification; handle the oldest batches beyond the pipeline depth.

        With ``pipeline_depth`` N, up to N batches are classified on the
        worker thread while this thread polls, decodes and writes; batches are
        handled strictly in order, so offsets become handled in order too.
        ``partitions``: every partition ``records`` hold (more do no harm), when
        the caller knows them. Caller holds the lock.
        """
        good, undecodable = decode_columns(records, self._decode)
        texts = good.texts
        if good and self._classifier is not None:
            results = self._classifier.submit(self._classify_batch, texts)
        else:
            results = Future()
            results.set_result(self._classify_batch(texts) if good else [])
        state = self._state
        if partitions is None:
            partitions = list({(r.topic, r.partition) for r in records})
        generations = {tp: state.generations.get(tp, 0) for tp in partitions}
        in_flight = state.in_flight
        in_flight.append(Batch(records, good, undecodable, results, generations))
        while len(in_flight) > self.config.pipeline_depth:
            self._finish(in_flight.popleft())

    def finish_ready(self) -> None:
        """Handle, in order, the batches whose classification is done (never waits)."""
        in_flight = self._state.in_flight
        while in_flight and in_flight[0].results.done():
            self._finish(in_flight.popleft())

    def drain(self) -> None:
        """Handle every batch in flight, waiting for their classification (rebalance, rebuild).

        Called inside rebalance callbacks, whose exceptions the client only
        logs: a failure is kept in the shared ``fatal`` (the loop raises it
        after poll), and the batches not handled are dropped (never
        committed, so redelivered).
        """
        try:
            self.finish_all()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the loop
            self._state.in_flight.clear()
            self._state.fatal = exc

    def finish_all(self) -> None:
        """Handle every batch in flight, in order, waiting for their classification."""
        in_flight = self._state.in_flight
        while in_flight:
            self._finish(in_flight.popleft())

    def _finish(self, batch: Batch) -> None:
        """Buffer rows and alerts and send dead letters of one classified batch; then mark its records handled.

        Classification ran before any dead letter of the batch is sent, so a
        DeviceError (no device live) leaves nothing of this batch behind.
        """
        state = self._state
        records, good, undecodable = batch.records, batch.good, batch.undecodable
        results = batch.results.result()
        stale = {tp for tp in batch.generations if state.stale(batch, tp)}
        if stale:  # a partition rewound while this batch was in flight: handled again after the rewind, not now
            keep = [i for i, r in enumerate(good.records) if (r.topic, r.partition) not in stale]
            good, results = good.select(keep), [results[i] for i in keep]
            undecodable = [(r, e) for r, e in undecodable if (r.topic, r.partition) not in stale]
            records = [r for r in records if (r.topic, r.partition) not in stale]
        for record, exc in undecodable:
            self._checkpoint.dead_letter(record, *decode_failure(exc))
        if len(good):
            self._write_labeled(batch, good, results)
        last: dict[TP, int] = {}
        for record in records:  # ascending per partition: the last one is the highest
            last[(record.topic, record.partition)] = record.offset
        for tp, offset in last.items():
            state.ledger.handled(tp, offset)

    def _write_labeled(self, batch: Batch, good: DecodedBatch, results: list[Prediction | BaseException]) -> None:
        """Dead-letter the texts that failed alone; buffer the rows of the others (one Arrow chunk, no object per
        row) and the alerts of those that may fire."""
        assert self._engine is not None
        failed, good, labeled_results = split_failed(good, results)
        for record, exc in failed:
            self._checkpoint.dead_letter(record, *inference_failure(exc))
        if not len(good):
            return
        records = good.records
        labeled: list[LabeledMessage] = []
        topics = {tp[0] for tp in batch.generations}
        columns = labeled_columns(good, labeled_results, int(time.time() * 1000), self._engine.model_name,
                                  one_topic=len(topics) == 1)
        labels, scores, event_times, heads = columns.labels, columns.scores, columns.event_times, columns.heads
        names = list(heads)
        every = self._rules.needs_every_message()  # else only messages that may fire the message rule
        may_fire = self._rules.may_fire
        alerting = range(len(labeled_results)) if every else [i for i, (label, score) in enumerate(zip(labels, scores))
                                                       if may_fire(label, score)]
        key_fields = self._key_fields
        for i in alerting:
            rec = records[i]
            key = None
            if key_fields:
                fields = good.fields_of(i)
                key = next((fields[f] for f in key_fields if f in fields), None)
            labeled.append(LabeledMessage(rec.topic, rec.partition, rec.offset, good.ids[i], labels[i], scores[i],
                                          int(event_times[i]), None if key is None else str(key),
                                          {name: (heads[name][0][i], heads[name][1][i]) for name in names}))
        # below a partition's floor the files hold its row (its alerts are sent again); usually none has one
        floors = {tp: floor for tp in batch.generations if (floor := self._rows_floor(tp)) is not None}
        rows_at: list[int] | None = None
        if floors:
            rows_at = [i for i, r in enumerate(records) if r.offset >= floors.get((r.topic, r.partition), -1)]
        chunk = columns.chunk
        if rows_at is not None and len(rows_at) < len(records):
            chunk = chunk.take(pa.array(rows_at, pa.int64()))  # typed: an empty list would be a null array
        self._checkpoint.write_chunk(chunk)
        self._checkpoint.write_alerts(self._rules.evaluate(labeled))

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
