"""Backfill output: rows, rejects and the done markers that make a rerun resume.

Layout under the output root (readers skip names that start with ``_``)::

    topic=<t>/date=<d>/part-<partition>-<first>-<last>.parquet   rows (the stream job's files)
    _rejects/topic=<t>/part-<partition>-<first>-<last>.parquet   rows without usable text, with why
    _backfill/topic=<t>/part-<partition>-<first>-<last>.done     a piece is finished

A piece (rows or offsets ``first``..``last`` of one input or partition) is
committed in this order: its row files (temp + fsync + rename, one per date),
its rejects file, then its marker. A piece is finished exactly when its
marker exists. :meth:`BackfillOutput.prepare`, run once per input before any
piece of it is labeled, removes what a killed run left of unfinished pieces
(temporary files, row and rejects files that no marker covers) and returns
the finished ranges, so the rerun labels every other row once.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from nlpstream.sinks import OutputRow, ParquetSink, WrittenFile, parse_name
from nlpstream.sinks.durable import write_durably
from nlpstream.sinks.naming import partition_glob

Range = tuple[int, int]
_MARK = re.compile(r"^part-(\d{5})-(\d{20})-(\d{20})\.(done|parquet)$")
REJECTS_DIR = "_rejects"
MARKERS_DIR = "_backfill"
REJECT_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("source", pa.string(), nullable=False),
    pa.field("partition", pa.int32(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("message", pa.string(), nullable=False),
])


@dataclass(frozen=True, slots=True)
class Reject:
    """A row that was not labeled: its id (None when the input has none), where it is (``source`` file or
    topic, partition, row number or offset) and why (``blank_text``, ``text_not_string``, ``missing_text``,
    ``inference``)."""

    id: str | None
    source: str
    partition: int
    offset: int
    reason: str
    message: str


def _name(partition: int, first: int, last: int, ext: str) -> str:
    return f"part-{partition:05d}-{first:020d}-{last:020d}.{ext}"


def merge(ranges: Sequence[Range]) -> list[Range]:
    """Sorted, with overlapping and adjacent ranges joined."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def covered(ranges: Sequence[Range], first: int, last: int) -> bool:
    """Whether merged ``ranges`` hold every number of ``first``..``last``."""
    return any(lo <= first and last <= hi for lo, hi in ranges)


def next_undone(ranges: Sequence[Range], start: int) -> int:
    """The first number from ``start`` on that merged ``ranges`` do not hold."""
    for lo, hi in ranges:
        if lo <= start <= hi:
            return hi + 1
    return start


class BackfillOutput:
    """Writes pieces and knows which are finished. One per process (each Ray actor has its own)."""

    def __init__(self, url: str, include_text: bool = True, compression: str = "zstd",
                 storage_options: dict[str, Any] | None = None) -> None:
        self.sink = ParquetSink(url, include_text, compression, storage_options=storage_options)
        self.fs, self.root = self.sink.fs, self.sink.root
        self._local = isinstance(self.fs, LocalFileSystem)

    def _abs(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if self.root else posixpath.join(*parts)

    def _ranges(self, folder: str, partition: int, ext: str) -> list[tuple[Range, str]]:
        out = []
        for path in self.fs.glob(self._abs(folder, f"part-{partition:05d}-*.{ext}")):
            m = _MARK.match(posixpath.basename(path))
            if m is not None and int(m.group(1)) == partition:
                out.append(((int(m.group(2)), int(m.group(3))), path))
        return out

    def prepare(self, topic: str, partition: int) -> list[Range]:
        """Remove what unfinished pieces of ``topic``/``partition`` left; return the finished ranges (merged).

        Call before any piece of the partition is labeled, from one process.
        """
        done = merge([r for r, _ in self._ranges(f"{MARKERS_DIR}/topic={topic}", partition, "done")])
        self.sink.remove_temp_files(topic, partition)
        leftovers = self.fs.glob(self._abs(f"{REJECTS_DIR}/topic={topic}", f".part-{partition:05d}-*"))
        leftovers += self.fs.glob(self._abs(f"{MARKERS_DIR}/topic={topic}", f".part-{partition:05d}-*"))
        for path in self.fs.glob(self._abs(partition_glob(topic, partition))):
            folder, name = posixpath.split(path)
            key = parse_name(topic, posixpath.basename(folder).removeprefix("date="), name)
            if key is not None and not covered(done, key.first_offset, key.last_offset):
                leftovers.append(path)
        leftovers += [path for (lo, hi), path in self._ranges(f"{REJECTS_DIR}/topic={topic}", partition, "parquet")
                      if not covered(done, lo, hi)]
        for path in leftovers:
            self.fs.rm(path)
        return done

    def commit(self, topic: str, partition: int, first: int, last: int, rows: list[OutputRow] | pa.Table,
               rejects: list[Reject], summary: dict[str, int]) -> list[WrittenFile]:
        """Make the piece ``first``..``last`` durable: rows (objects, or an Arrow chunk of them:
        :mod:`nlpstream.sinks.chunks`), then rejects, then its marker (``summary`` is stored in the marker).
        Raises SinkError or OSError; the piece then stays unfinished."""
        if isinstance(rows, pa.Table):
            self.sink.write_chunk(rows)
        else:
            self.sink.write(rows)
        files = self.sink.flush()
        if rejects:
            table = pa.Table.from_pylist([{"id": r.id, "source": r.source, "partition": r.partition,
                                           "offset": r.offset, "reason": r.reason, "message": r.message}
                                          for r in rejects], schema=REJECT_SCHEMA)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd")
            self._atomic_write(f"{REJECTS_DIR}/topic={topic}", _name(partition, first, last, "parquet"),
                               sink.getvalue().to_pybytes())
        marker = dict(summary, files=[f.path for f in files])
        self._atomic_write(f"{MARKERS_DIR}/topic={topic}", _name(partition, first, last, "done"),
                           json.dumps(marker).encode())
        return files

    def _atomic_write(self, folder: str, name: str, data: bytes) -> None:
        folder = self._abs(folder)
        final, temp = f"{folder}/{name}", f"{folder}/.{name}.tmp"
        self.fs.makedirs(folder, exist_ok=True)
        if not self._local:
            self.fs.pipe(temp, data)
            self.fs.mv(temp, final)
            return
        write_durably(temp, final, lambda fh: fh.write(data), folder)


__all__ = ["BackfillOutput", "REJECT_SCHEMA", "Range", "Reject", "covered", "merge", "next_undone"]
