"""The backfill job: re-label files (JSONL, CSV, Parquet) with the same engine and output schema.

Rows go to ``topic=<name>/date=<day of the event time or today>/`` where
``name`` is ``topic_name`` when set, else the input file's stem (so inputs
never overwrite each other), ``partition`` = 0 (or the input's position in
the argument list when ``topic_name`` is shared) and ``offset`` = the row
number in that file: a rerun writes the same file names, replacing its own
earlier output.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from nlpstream.inference import Engine
from nlpstream.jobs.config import BackfillConfig
from nlpstream.sinks import OutputRow, ParquetSink

log = logging.getLogger(__name__)


class BackfillError(Exception):
    """An input cannot be read or lacks the text column."""


@dataclass
class BackfillSummary:
    rows: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)  # "file:row: reason" of texts the model failed on alone
    files: list[str] = field(default_factory=list)
    labels: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def read_table(path: Path) -> pa.Table:
    """Read one input by its extension (.jsonl/.json, .csv, .parquet)."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            return pajson.read_json(path)
        if suffix == ".csv":
            return pacsv.read_csv(path)
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BackfillError(f"cannot read {path}: {exc}") from exc
    raise BackfillError(f"unsupported input {path}: expected .jsonl, .csv or .parquet")


def _batches(table: pa.Table, text_field: str, id_field: str, size: int) -> Iterator[tuple[int, list[Any], list[Any], list[Any]]]:
    if text_field not in table.column_names:
        raise BackfillError(f"input has no column {text_field!r} (columns: {', '.join(table.column_names)})")
    ids = table.column(id_field) if id_field in table.column_names else None
    times = table.column("event_time") if "event_time" in table.column_names else None
    for start in range(0, table.num_rows, size):
        texts = table.column(text_field).slice(start, size).to_pylist()
        id_list = ids.slice(start, size).to_pylist() if ids is not None else [None] * len(texts)
        time_list = times.slice(start, size).to_pylist() if times is not None else [None] * len(texts)
        yield start, texts, id_list, time_list


def _to_ms(value: Any, default: int) -> int:
    if value is None:
        return default
    if hasattr(value, "timestamp"):
        return int(value.timestamp() * 1000)
    if isinstance(value, (int, float)):
        return int(value)
    return default


def _safe_name(stem: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)
    return cleaned or "backfill"


def _classify_each(engine: Any, texts: list[str]) -> list[Any]:
    """Predictions, with an exception in place of each text the model fails on alone (engines
    without ``classify_each`` are asked for every text at once)."""
    each = getattr(engine, "classify_each", None)
    return list(each(texts)) if each is not None else list(engine.classify(texts))


def run_backfill(config: BackfillConfig, inputs: list[Path], engine: Engine, progress: Any = None,
                 batch_size: int = 2048) -> BackfillSummary:
    """Label every row of ``inputs``; rows with empty or non-string text are counted as skipped."""
    summary = BackfillSummary()
    started = time.monotonic()
    sink = ParquetSink(config.output.output, config.output.include_text,
                       config.output.compression, storage_options=config.output.storage_options)
    tables = [(i, path, read_table(path)) for i, path in enumerate(inputs)]
    total = sum(t.num_rows for _, _, t in tables)
    task = progress.add_task("labeling", total=total) if progress is not None else None
    for file_index, path, table in tables:
        for start, texts, ids, times in _batches(table, config.text_field, config.id_field, batch_size):
            now_ms = int(time.time() * 1000)
            usable = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
            summary.skipped += len(texts) - len(usable)
            results = _classify_each(engine, [texts[i] for i in usable])
            for i, p in zip(usable, results):
                if isinstance(p, Exception):
                    summary.failed.append(f"{path.name}:{start + i}: {p}")
                    log.warning("%s row %d: the model fails on this text alone: %s", path.name, start + i, p)
            labeled = [(i, p) for i, p in zip(usable, results) if not isinstance(p, Exception)]
            rows = [
                OutputRow(config.topic_name or _safe_name(path.stem), file_index if config.topic_name else 0, start + i,
                          str(ids[i]) if ids[i] is not None else f"{path.name}-{start + i}",
                          texts[i], p.label, p.score, _to_ms(times[i], now_ms), now_ms, engine.model_name,
                          tuple((name, h.label, h.score) for name, h in getattr(p, "heads", {}).items()))
                for i, p in labeled
            ]
            sink.write(rows)
            summary.rows += len(rows)
            summary.labels.update(r.label for r in rows)
            if sink.buffered >= config.rows_per_file:
                summary.files.extend(f.path for f in sink.flush())
            if progress is not None:
                progress.update(task, advance=len(texts))
    summary.files.extend(f.path for f in sink.flush())
    summary.seconds = time.monotonic() - started
    return summary
