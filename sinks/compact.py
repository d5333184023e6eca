"""Compaction: merge the small files that low-latency flushes leave into larger ones.

- **Parquet folders** (local disk): per ``topic=<t>/date=<d>`` folder, runs of
  consecutive files of one Kafka partition are merged (up to
  ``target_rows`` rows a file) into a hidden staging folder, next to files
  that stay as they are (hard links); then the staging folder and the live
  folder are swapped in one ``renameat2(RENAME_EXCHANGE)`` call, so a reader
  lists either the old set of files or the new one, never both and never
  neither. A file the stream job finished in the folder meanwhile (a late
  event) is moved over right after the swap. Merged files keep the
  deterministic names (partition, first offset, last offset), so the job's
  resume and zombie checks read them as before. Object stores have no atomic
  swap: compact those with a table format.
- **Delta Lake**: delta-rs ``optimize.compact`` per date (one commit; the
  application transactions that hold the Kafka progress are kept).
- **Iceberg**: the rows of each (topic, date) are rewritten by one
  ``overwrite`` commit (compare-and-swap on the snapshot read), carrying the
  Kafka progress forward in the snapshot summary.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from nlpstream.sinks.durable import fsync_dir, write_durably
from nlpstream.sinks.errors import SinkError
from nlpstream.sinks.naming import FileKey, parse_name

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@dataclass
class CompactResult:
    """Files (or data files) before and after, per compacted partition folder or table date."""

    partitions: list[str]
    files_before: int = 0
    files_after: int = 0
    rows: int = 0


def exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); OSError where unsupported."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if not hasattr(libc, "renameat2"):
        raise OSError("renameat2 is not available (Linux with glibc 2.28 or newer is needed)")
    if libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _groups(keys: list[tuple[FileKey, Path, int]], target_rows: int) -> list[list[tuple[FileKey, Path, int]]]:
    """Runs of one partition's files in offset order, each at most ``target_rows`` rows (a file alone may be more)."""
    out: list[list[tuple[FileKey, Path, int]]] = []
    for _, files in groupby(sorted(keys, key=lambda k: (k[0].partition, k[0].first_offset)), key=lambda k: k[0].partition):
        current: list[tuple[FileKey, Path, int]] = []
        for item in files:
            if current and sum(n for _, _, n in current) + item[2] > target_rows:
                out.append(current)
                current = []
            current.append(item)
        if current:
            out.append(current)
    return out


def compact_parquet_folder(folder: Path, topic: str, date: str, target_rows: int = 1_000_000,
                           compression: str = "zstd") -> tuple[int, int, int]:
    """Compact one ``topic=/date=`` folder; returns (files before, files after, rows). Nothing to do: no swap."""
    keys = []
    for path in folder.iterdir():
        key = parse_name(topic, date, path.name)
        if key is not None:
            keys.append((key, path, pq.ParquetFile(path).metadata.num_rows))
    groups = _groups(keys, target_rows)
    rows = sum(n for _, _, n in keys)
    if all(len(g) == 1 for g in groups):
        return len(keys), len(keys), rows
    staging = folder.parent / f".compact-{folder.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for group in groups:
            if len(group) == 1:
                os.link(group[0][1], staging / group[0][1].name)
                continue
            first, last = group[0][0], group[-1][0]
            merged = FileKey(topic, date, first.partition, first.first_offset, last.last_offset)
            table = pa.concat_tables([pq.read_table(path) for _, path, _ in group])
            temp = staging / f".{merged.name}.tmp"
            write_durably(temp, staging / merged.name, lambda fh, t=table: pq.write_table(t, fh, compression=compression))
        fsync_dir(staging)
        exchange(staging, folder)  # readers now list the compacted set; staging holds the old files
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    inputs = {path.name for _, path, _ in keys}
    for path in staging.iterdir():  # a file finished in the old folder after the listing (a late event)
        if parse_name(topic, date, path.name) is not None and path.name not in inputs:
            os.replace(path, folder / path.name)
    fsync_dir(folder)
    shutil.rmtree(staging, ignore_errors=True)
    return len(keys), len(groups), rows


def compact_parquet(url: str, dates: Sequence[str] | None, topic: str | None = None,
                    target_rows: int = 1_000_000, before: str | None = None) -> CompactResult:
    """Compact the hive folders of a local Parquet output: ``dates``, or every day before ``before``
    (the stream job still writes today's folder), or all."""
    if "://" in url and not url.startswith("file://"):
        raise SinkError(f"{url}: plain Parquet folders are compacted on a local disk only (an object store has no "
                        "atomic folder swap, so readers could see rows twice or miss some); write object-store "
                        "output as --output-format delta or iceberg and compact the table")
    root = Path(url.removeprefix("file://"))
    if not root.is_dir():
        raise SinkError(f"{root} is not a folder")
    result = CompactResult(partitions=[])
    for topic_dir in sorted(root.glob(f"topic={topic}" if topic else "topic=*")):
        name = topic_dir.name.removeprefix("topic=")
        for date_dir in sorted(topic_dir.glob("date=*")):
            day = date_dir.name.removeprefix("date=")
            if (dates and day not in dates) or (before and day >= before):
                continue
            before, after, rows = compact_parquet_folder(date_dir, name, day, target_rows)
            result.partitions.append(f"{topic_dir.name}/{date_dir.name}")
            result.files_before += before
            result.files_after += after
            result.rows += rows
    return result


def compact_delta(url: str, dates: Sequence[str] | None, topic: str | None = None,
                  storage_options: dict[str, str] | None = None) -> CompactResult:
    """delta-rs optimize (bin-packing compaction), one commit per date (or one for the whole table)."""
    from deltalake import DeltaTable

    table = DeltaTable(url, storage_options=storage_options or None)
    result = CompactResult(partitions=[])
    for day in (dates or [None]):
        filters: list[tuple[str, str, Any]] = []
        if day:
            filters.append(("date", "=", day))
        if topic:
            filters.append(("topic", "=", topic))
        stats = table.optimize.compact(partition_filters=filters or None)
        result.partitions.append(day or "all")
        result.files_before += int(stats.get("numFilesRemoved", 0))
        result.files_after += int(stats.get("numFilesAdded", 0))
        table = DeltaTable(url, storage_options=storage_options or None)
    return result


def compact_iceberg(catalog: dict[str, Any], identifier: str, dates: Sequence[str] | None,
                    topic: str | None = None, tries: int = 5) -> CompactResult:
    """Rewrite each (topic, date) of an Iceberg table in one overwrite commit (retried on a concurrent commit)."""
    from pyiceberg.catalog import load_catalog
    from pyiceberg.exceptions import CommitFailedException
    from pyiceberg.expressions import And, EqualTo

    from nlpstream.sinks.tables import IcebergSink

    props = dict(catalog)
    cat = load_catalog(str(props.pop("name", "default")), **props)
    table = cat.load_table(identifier)
    pairs = table.scan(selected_fields=("topic", "date")).to_arrow()
    wanted = sorted({(t, d) for t, d in zip(pairs.column("topic").to_pylist(), pairs.column("date").to_pylist())
                     if (not dates or d in dates) and (not topic or t == topic)})
    result = CompactResult(partitions=[])
    for t, d in wanted:
        where = And(EqualTo("topic", t), EqualTo("date", d))
        for attempt in range(tries):
            table = cat.load_table(identifier)
            files = sum(1 for part in table.inspect.files().column("partition").to_pylist()
                        if part.get("topic") == t and part.get("date") == d)
            if files <= 1:
                break
            data = table.scan(row_filter=where).to_arrow()
            try:
                table.overwrite(data, overwrite_filter=where, snapshot_properties=IcebergSink.progress_of(table))
            except CommitFailedException:
                if attempt == tries - 1:
                    raise
                continue
            result.files_before += files
            result.files_after += 1
            result.rows += data.num_rows
            break
        result.partitions.append(f"topic={t}/date={d}")
    return result
