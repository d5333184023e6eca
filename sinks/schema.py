"""The output row and its Arrow schema (stable: outside readers depend on it).

Files hold the columns below; ``topic`` and ``date`` are hive folder keys
(``topic=<topic>/date=<YYYY-MM-DD>/``) and are not repeated inside files.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa


@dataclass(slots=True, unsafe_hash=True)  # not frozen: one per message, and a frozen __init__ costs ~2 us more
class OutputRow:
    """One labeled message. Times are milliseconds since the epoch, UTC."""

    topic: str
    partition: int
    offset: int
    id: str
    text: str
    label: str
    score: float
    event_time_ms: int
    processed_at_ms: int
    model: str
    heads: tuple[tuple[str, str, float], ...] = ()  # (name, label, score) of every further head, in model order

    @property
    def date(self) -> str:
        """The hive ``date`` key: the UTC day of the event time."""
        return utc_day(self.event_time_ms // 86_400_000)


@functools.lru_cache(maxsize=4096)
def utc_day(day_number: int) -> str:
    """``YYYY-MM-DD`` of a day counted from the Unix epoch (one strftime per day, not per row)."""
    return datetime.fromtimestamp(day_number * 86_400, tz=timezone.utc).strftime("%Y-%m-%d")


_TS = pa.timestamp("ms", tz="UTC")


def arrow_schema(include_text: bool = True, heads: Sequence[str] = ()) -> pa.Schema:
    """Columns inside each file, in order; every further head ``name`` adds ``<name>_label`` and
    ``<name>_score`` after ``score``."""
    fields = [pa.field("id", pa.string(), nullable=False)]
    if include_text:
        fields.append(pa.field("text", pa.string()))
    fields += [
        pa.field("label", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
    ]
    for name in heads:
        fields += [pa.field(f"{name}_label", pa.string(), nullable=False),
                   pa.field(f"{name}_score", pa.float32(), nullable=False)]
    fields += [
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("event_time", _TS, nullable=False),
        pa.field("processed_at", _TS, nullable=False),
        pa.field("model", pa.string(), nullable=False),
    ]
    return pa.schema(fields)


def warm_up_arrow() -> None:
    """Build one empty table now: pyarrow imports pandas on its first array (~0.7 s here), else in the first flush."""
    to_table([])


def to_table(rows: Sequence[OutputRow], include_text: bool = True) -> pa.Table:
    """Rows -> Arrow table with :func:`arrow_schema` (order kept); the first row names the heads."""
    columns: dict[str, list[object]] = {"id": [r.id for r in rows]}
    if include_text:
        columns["text"] = [r.text for r in rows]
    columns.update(
        label=[r.label for r in rows],
        score=[r.score for r in rows],
    )
    names = [h[0] for h in rows[0].heads] if rows else []
    for k, name in enumerate(names):
        columns[f"{name}_label"] = [r.heads[k][1] for r in rows]
        columns[f"{name}_score"] = [r.heads[k][2] for r in rows]
    columns.update(
        partition=[r.partition for r in rows],
        offset=[r.offset for r in rows],
        event_time=[r.event_time_ms for r in rows],
        processed_at=[r.processed_at_ms for r in rows],
        model=[r.model for r in rows],
    )
    return pa.Table.from_pydict(columns, schema=arrow_schema(include_text, names))
