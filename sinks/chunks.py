"""Rows as Arrow columns: what the row sinks buffer, sort and split into files.

A *chunk* is an Arrow table of labeled rows with the columns of
:class:`~nlpstream.sinks.schema.OutputRow`: ``topic``, ``partition``,
``offset``, ``id``, ``text``, ``label``, ``score``, ``<head>_label`` and
``<head>_score`` for every further head, ``event_time`` and
``processed_at`` (int64 milliseconds), ``model``. The stream job builds
chunks straight from a batch's columns (:func:`columns_chunk`), with no
object per row; rows written as :class:`OutputRow` objects become one chunk
per write (:func:`rows_chunk`). A flush concatenates the chunks, sorts them
by (topic, partition, offset) in Arrow (:func:`sorted_rows`) and splits
them into runs of one (topic, partition, day) (:func:`runs`), so no
Python code runs per row on the flush's side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nlpstream.sinks.schema import OutputRow, arrow_schema, utc_day

_MS_PER_DAY = 86_400_000
_TS = pa.timestamp("ms", tz="UTC")
_BASE = ("topic", "partition", "offset", "id", "text", "label", "score")
_TAIL = ("event_time", "processed_at", "model")


def chunk_schema(heads: Sequence[str] = ()) -> pa.Schema:
    """The columns of a chunk (see the module docstring)."""
    fields = [pa.field("topic", pa.string()), pa.field("partition", pa.int32()), pa.field("offset", pa.int64()),
              pa.field("id", pa.string()), pa.field("text", pa.string()), pa.field("label", pa.string()),
              pa.field("score", pa.float32())]
    for name in heads:
        fields += [pa.field(f"{name}_label", pa.string()), pa.field(f"{name}_score", pa.float32())]
    fields += [pa.field("event_time", pa.int64()), pa.field("processed_at", pa.int64()), pa.field("model", pa.string())]
    return pa.schema(fields)


def head_names(chunk: pa.Table) -> list[str]:
    """The further heads a chunk carries, in model order."""
    return [n.removesuffix("_label") for n in chunk.column_names[len(_BASE):-len(_TAIL)] if n.endswith("_label")]


def columns_chunk(topics: list[str] | str, partitions: list[int], offsets: list[int], ids: list[str], texts: list[str],
                  labels: list[str], scores: list[float], event_times: Sequence[int] | np.ndarray, processed_at_ms: int, model: str,
                  heads: dict[str, tuple[list[str], list[float]]] | None = None) -> pa.Table:
    """A chunk from a batch's columns (equal lengths; ``topics`` one string when every row has that topic;
    ``heads``: name -> (labels, scores), in model order)."""
    n = len(offsets)
    topic_array = _repeated(topics, n) if isinstance(topics, str) else pa.array(topics, pa.string())
    arrays = [topic_array, pa.array(partitions, pa.int32()), pa.array(offsets, pa.int64()),
              pa.array(ids, pa.string()), pa.array(texts, pa.string()), pa.array(labels, pa.string()),
              pa.array(scores, pa.float32())]
    names = list(heads or ())
    for name in names:
        head_labels, head_scores = heads[name]  # type: ignore[index]
        arrays += [pa.array(head_labels, pa.string()), pa.array(head_scores, pa.float32())]
    arrays += [pa.array(event_times, pa.int64()), pa.array(np.full(n, processed_at_ms, dtype=np.int64)),
               _repeated(model, n)]
    return pa.Table.from_arrays(arrays, schema=chunk_schema(names))


def _repeated(value: str, n: int) -> pa.Array:
    """``n`` times ``value`` as a string array, built in Arrow (a third of the time of a list of n strings)."""
    return pa.repeat(pa.scalar(value, pa.string()), n)


def rows_chunk(rows: Sequence[OutputRow]) -> pa.Table:
    """A chunk of :class:`OutputRow` objects (the first row names the heads)."""
    names = [h[0] for h in rows[0].heads] if rows else []
    heads = {name: ([r.heads[k][1] for r in rows], [r.heads[k][2] for r in rows]) for k, name in enumerate(names)}
    arrays = [pa.array([r.topic for r in rows], pa.string()), pa.array([r.partition for r in rows], pa.int32()),
              pa.array([r.offset for r in rows], pa.int64()), pa.array([r.id for r in rows], pa.string()),
              pa.array([r.text for r in rows], pa.string()), pa.array([r.label for r in rows], pa.string()),
              pa.array([r.score for r in rows], pa.float32())]
    for head_labels, head_scores in heads.values():
        arrays += [pa.array(head_labels, pa.string()), pa.array(head_scores, pa.float32())]
    arrays += [pa.array([r.event_time_ms for r in rows], pa.int64()),
               pa.array([r.processed_at_ms for r in rows], pa.int64()), pa.array([r.model for r in rows], pa.string())]
    return pa.Table.from_arrays(arrays, schema=chunk_schema(names))


def sorted_rows(chunks: Sequence[pa.Table]) -> pa.Table:
    """The chunks as one table in (topic, partition, offset) order (a stable sort: ties keep their order)."""
    table = pa.concat_tables(chunks) if len(chunks) > 1 else chunks[0]
    if table.num_rows == 0:
        return table
    keys = [("partition", "ascending"), ("offset", "ascending")]
    if pc.count_distinct(table["topic"]).as_py() > 1:
        keys.insert(0, ("topic", "ascending"))
    indices = pc.sort_indices(table, sort_keys=keys)
    if _is_identity(indices):
        return table
    return table.take(indices)


def _is_identity(indices: pa.Array) -> bool:
    values = indices.to_numpy()
    return bool(np.all(values[1:] > values[:-1])) if len(values) > 1 else True


def without(chunks: Sequence[pa.Table], topic: str, partition: int) -> list[pa.Table]:
    """The chunks without the rows of one partition (empty chunks dropped)."""
    out = []
    for chunk in chunks:
        drop = pc.and_(pc.equal(chunk["topic"], topic), pc.equal(chunk["partition"], partition))
        kept = chunk.filter(pc.invert(drop))
        if kept.num_rows:
            out.append(kept)
    return out


@dataclass(frozen=True, slots=True)
class Run:
    """Consecutive sorted rows of one (topic, partition, UTC day): what one file holds."""

    topic: str
    partition: int
    date: str
    table: pa.Table

    @property
    def first_offset(self) -> int:
        return int(self.table["offset"][0].as_py())

    @property
    def last_offset(self) -> int:
        return int(self.table["offset"][-1].as_py())

    @property
    def offsets(self) -> np.ndarray:
        return self.table["offset"].to_numpy()


def _boundaries(table: pa.Table, by_day: bool) -> list[int]:
    """Start indices of each run of equal (topic, partition[, day]) in a sorted table, and its length at the end."""
    n = table.num_rows
    change = np.zeros(n, dtype=bool)
    change[0] = True
    partitions = table["partition"].to_numpy()
    change[1:] |= partitions[1:] != partitions[:-1]
    if by_day:
        days = table["event_time"].to_numpy() // _MS_PER_DAY
        change[1:] |= days[1:] != days[:-1]
    topics = table["topic"]
    if pc.count_distinct(topics).as_py() > 1:
        codes = pc.index_in(topics, value_set=pc.unique(topics)).to_numpy()
        change[1:] |= codes[1:] != codes[:-1]
    return [*np.flatnonzero(change).tolist(), n]


def runs(table: pa.Table, by_day: bool = True) -> list[Run]:
    """A sorted table split into runs of one (topic, partition, day); ``by_day`` False: of one (topic, partition)
    (the run's ``date`` is then its first row's)."""
    if table.num_rows == 0:
        return []
    bounds = _boundaries(table, by_day)
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        piece = table.slice(start, end - start)
        day = int(piece["event_time"][0].as_py()) // _MS_PER_DAY
        out.append(Run(piece["topic"][0].as_py(), int(piece["partition"][0].as_py()), utc_day(day), piece))
    return out


def dates(table: pa.Table) -> pa.Array:
    """The ``YYYY-MM-DD`` UTC day of every row's event time (one strftime per distinct day)."""
    days = pa.array(table["event_time"].to_numpy() // _MS_PER_DAY)
    distinct = pc.unique(days)
    names = pa.array([utc_day(d) for d in distinct.to_pylist()], pa.string())
    return pc.take(names, pc.index_in(days, value_set=distinct))


def file_table(table: pa.Table, include_text: bool) -> pa.Table:
    """The columns one file holds (:func:`~nlpstream.sinks.schema.arrow_schema`), from chunk rows."""
    heads = head_names(table)
    schema = arrow_schema(include_text, heads)
    arrays = []
    for field in schema:
        column = table[field.name]
        if field.name in ("event_time", "processed_at"):
            column = column.cast(_TS)
        arrays.append(column)
    return pa.Table.from_arrays(arrays, schema=schema)
