"""The backfill job: re-label files (JSONL, CSV, Parquet; local or fsspec URLs) into the stream job's output.

Rows go to ``topic=<name>/date=<day of the event time or today>/`` where
``name`` is ``topic_name`` when set, else the input file's stem;
``partition`` is 0 (or the file's position in the input list when
``topic_name`` is shared, or its count among files with the same stem) and
``offset`` is the row number in the file.

Inputs are read as pieces of ``rows_per_file`` rows (see
:mod:`backfill_inputs`); each piece is labeled, then committed by
:class:`backfill_output.BackfillOutput` (rows, rejects, marker). A rerun
skips finished pieces and removes what unfinished ones left, so after a
crash every row ends up exactly once. Rows without usable text, and texts
the model fails on alone, are rejects: written under ``_rejects/`` with
their id, position and reason, and counted.

This module holds what every executor shares (labeling a piece, the
summary, progress) and the local executor; :mod:`backfill_ray` runs the
same pieces on Ray Data, :mod:`backfill_kafka` replays a Kafka time range.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlpstream.consumers.errors import DECODE_KINDS
from nlpstream.jobs import metrics
from nlpstream.jobs.backfill_inputs import (BackfillError, InputFile, Piece, count_rows, expand_inputs,
                                            check_input, read_pieces)
from nlpstream.jobs.backfill_output import BackfillOutput, Range, Reject, covered
from nlpstream.jobs.config import BackfillConfig
from nlpstream.jobs.gc_tuning import tuned_gc
from nlpstream.sinks import OutputRow

log = logging.getLogger(__name__)
REJECT_REASONS = (*DECODE_KINDS, "inference")
CLASSIFY_CHUNK = 512  # texts per engine call inside a piece (the engine batches by tokens below that)

__all__ = ["BackfillError", "BackfillSummary", "PieceResult", "Tracker", "label_piece", "plan_inputs",
           "run_backfill"]


@dataclass
class PieceResult:
    """What labeling one piece did (plain data: it travels back from Ray actors)."""

    topic: str
    rows: int = 0
    skipped: int = 0  # rows without usable text
    failed: list[str] = field(default_factory=list)  # "file:row: reason" of texts the model fails on alone
    dead_lettered: dict[str, int] = field(default_factory=dict)  # reason -> records (Kafka replay)
    labels: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    rejects: dict[str, int] = field(default_factory=dict)  # reason -> rows written to _rejects


@dataclass
class BackfillSummary:
    rows: int = 0
    skipped: int = 0  # rows without usable text (rejects other than model failures)
    failed: list[str] = field(default_factory=list)  # "file:row: reason" of texts the model failed on alone
    dead_lettered: int = 0  # Kafka replay: records sent to the dead-letter topic
    already_done: int = 0  # rows (or offsets) of pieces a previous run finished
    pieces: int = 0
    files: list[str] = field(default_factory=list)
    labels: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    executor: str = "local"

    @property
    def rejected(self) -> int:
        return self.skipped + len(self.failed)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def add(self, result: PieceResult) -> None:
        """Count a committed piece (and move the stream job's metrics the same way)."""
        self.pieces += 1
        self.rows += result.rows
        self.skipped += result.skipped
        self.failed.extend(result.failed)
        self.dead_lettered += sum(result.dead_lettered.values())
        self.files.extend(result.files)
        self.labels.update(result.labels)
        if result.rows:
            metrics.LABELED.labels(result.topic).inc(result.rows)
        for reason, n in {**result.rejects, **result.dead_lettered}.items():
            metrics.DEAD_LETTERED.labels(result.topic, reason).inc(n)


class Tracker:
    """Progress of one run: a rich Progress task (rate, ETA) when ``progress`` is given, else nothing.

    ``progress`` is anything with rich's ``add_task(description, total=)`` and ``update(task, advance=)``.
    """

    def __init__(self, progress: Any, total: int | None, description: str = "labeling") -> None:
        self._progress = progress
        self._task = progress.add_task(description, total=total) if progress is not None else None

    def advance(self, n: int) -> None:
        if self._progress is not None and n:
            self._progress.update(self._task, advance=n)


def _to_ms(value: Any, default: int) -> int:
    if value is None:
        return default
    if hasattr(value, "timestamp"):
        return int(value.timestamp() * 1000)
    if isinstance(value, (int, float)):
        return int(value)
    return default


def _classify_each(engine: Any, texts: list[str]) -> list[Any]:
    """Predictions, with an exception in place of each text the model fails on alone (engines
    without ``classify_each`` are asked for every text at once)."""
    if not texts:
        return []
    metrics.BATCH_TEXTS.observe(len(texts))
    started = time.perf_counter()
    each = getattr(engine, "classify_each", None)
    results = list(each(texts)) if each is not None else list(engine.classify(texts))
    metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
    return results


def _why_unusable(text: Any, text_field: str) -> tuple[str, str] | None:
    if text is None:
        return "missing_text", f"{text_field!r} is null"
    if not isinstance(text, str):
        return "text_not_string", f"{text_field!r} is a {type(text).__name__}, expected a string"
    if not text.strip():
        return "blank_text", f"{text_field!r} is blank"
    return None


def label_piece(piece: Piece, engine: Any, out: BackfillOutput, text_field: str, id_field: str,
                advance: Callable[[int], None] = lambda n: None, chunk: int = CLASSIFY_CHUNK) -> PieceResult:
    """Label one piece and commit it (rows, rejects, marker); ``advance(n)`` reports rows as they are done.

    Raises what the engine raises for the whole batch (no live device) and
    the sink's errors; the piece then stays unfinished.
    """
    table = piece.table
    names = table.column_names
    texts = table.column(text_field).to_pylist()
    ids = table.column(id_field).to_pylist() if id_field in names else [None] * len(texts)
    times = table.column("event_time").to_pylist() if "event_time" in names else [None] * len(texts)
    file_name = posixpath.basename(piece.source)
    result = PieceResult(piece.topic)
    rejects: list[Reject] = []
    usable: list[int] = []
    for i, text in enumerate(texts):
        why = _why_unusable(text, text_field)
        if why is None:
            usable.append(i)
        else:
            rejects.append(Reject(None if ids[i] is None else str(ids[i]), piece.source, piece.partition,
                                  piece.first + i, *why))
    result.skipped = len(rejects)
    advance(len(rejects))
    rows: list[OutputRow] = []
    model = engine.model_name
    for start in range(0, len(usable), chunk):
        part = usable[start:start + chunk]
        now_ms = int(time.time() * 1000)
        for i, p in zip(part, _classify_each(engine, [texts[i] for i in part])):
            row = piece.first + i
            if isinstance(p, BaseException):
                result.failed.append(f"{file_name}:{row}: {p}")
                log.warning("%s row %d: the model fails on this text alone: %s", file_name, row, p)
                rejects.append(Reject(None if ids[i] is None else str(ids[i]), piece.source, piece.partition, row,
                                      "inference", f"classification failed: {p}"))
                continue
            heads = tuple((name, h.label, h.score) for name, h in getattr(p, "heads", {}).items())
            rows.append(OutputRow(piece.topic, piece.partition, row,
                                  str(ids[i]) if ids[i] is not None else f"{file_name}-{row}", texts[i], p.label,
                                  p.score, _to_ms(times[i], now_ms), now_ms, model, heads=heads))
        advance(len(part))
    result.rows = len(rows)
    result.labels = dict(Counter(r.label for r in rows))
    result.rejects = dict(Counter(r.reason for r in rejects))
    files = out.commit(piece.topic, piece.partition, piece.first, piece.last, rows, rejects,
                       {"rows": result.rows, "rejects": len(rejects)})
    result.files = [f.path for f in files]
    return result


def plan_inputs(config: BackfillConfig, inputs: list[str], out: BackfillOutput
                ) -> tuple[list[InputFile], dict[tuple[str, int], list[Range]], int]:
    """Expand and check every input (readable, has the text column) before anything is labeled; clean up
    what a killed run left; return the files, the finished ranges of each and how many rows they hold."""
    files = expand_inputs(inputs, config.topic_name)
    for f in files:
        check_input(f, config.text_field, config.id_field, config.read_block_bytes)
    done: dict[tuple[str, int], list[Range]] = {}
    for f in files:
        done[(f.topic, f.partition)] = out.prepare(f.topic, f.partition)
    finished = sum(hi - lo + 1 for ranges in done.values() for lo, hi in ranges)
    metrics.init_series(sorted({f.topic for f in files}), REJECT_REASONS)
    return files, done, finished


def total_rows(files: list[InputFile]) -> int | None:
    """Rows of all inputs, or None when any count is unknown."""
    counts = [count_rows(f) for f in files]
    return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)


def run_backfill(config: BackfillConfig, inputs: list[str | Path], engine: Any, progress: Any = None,
                 batch_size: int = CLASSIFY_CHUNK) -> BackfillSummary:
    """Label every row of ``inputs`` in this process (the local executor); see the module docstring.

    Raises BackfillError (input missing, unreadable or without the text
    column), SinkError (output unusable) and the engine's fatal errors.
    """
    summary = BackfillSummary()
    started = time.monotonic()
    out = BackfillOutput(config.output.output, config.output.include_text, config.output.compression,
                         storage_options=config.output.storage_options)
    files, done, summary.already_done = plan_inputs(config, [str(p) for p in inputs], out)
    total = total_rows(files)
    tracker = Tracker(progress, None if total is None else max(0, total - summary.already_done))
    with tuned_gc(config.gc_tuning):  # the engine's result objects set off no full scans of what start-up loaded
        for f in files:
            finished = done[(f.topic, f.partition)]
            for piece in read_pieces(f, config.text_field, config.id_field, config.rows_per_file,
                                     config.read_block_bytes):
                n = piece.table.num_rows
                metrics.CONSUMED.labels(f.topic).inc(n)
                if covered(finished, piece.first, piece.last):
                    metrics.SKIPPED.labels(f.topic).inc(n)
                    continue
                summary.add(label_piece(piece, engine, out, config.text_field, config.id_field, tracker.advance,
                                        batch_size))
    summary.seconds = time.monotonic() - started
    return summary
