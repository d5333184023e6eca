"""Deterministic output file names.

``topic=<topic>/date=<YYYY-MM-DD>/part-<partition>-<first offset>-<last offset>.parquet``
with zero-padded numbers so names sort by offset. Temporary files carry a
leading ``.`` (skipped by Spark, DuckDB and pyarrow).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PART = re.compile(r"^part-(\d{5})-(\d{20})-(\d{20})\.parquet$")


@dataclass(frozen=True, slots=True)
class FileKey:
    """Where a file lives and the offsets of its first and last row."""

    topic: str
    date: str
    partition: int
    first_offset: int
    last_offset: int

    @property
    def folder(self) -> str:
        return f"topic={self.topic}/date={self.date}"

    @property
    def name(self) -> str:
        return f"part-{self.partition:05d}-{self.first_offset:020d}-{self.last_offset:020d}.parquet"

    @property
    def path(self) -> str:
        return f"{self.folder}/{self.name}"

    @property
    def temp_name(self) -> str:
        return f".{self.name}.tmp"


def parse_name(topic: str, date: str, name: str) -> FileKey | None:
    """The key of a finished file name, or None for anything else (temp files included)."""
    match = _PART.match(name)
    if match is None:
        return None
    return FileKey(topic, date, int(match.group(1)), int(match.group(2)), int(match.group(3)))


def partition_glob(topic: str, partition: int, date: str = "*") -> str:
    """Glob (relative to the output root) matching the finished files of one partition (of one date)."""
    return f"topic={topic}/date={date}/part-{partition:05d}-*.parquet"


def temp_glob(topic: str, partition: int) -> str:
    """Glob matching leftover temporary files of one partition."""
    return f"topic={topic}/date=*/.part-{partition:05d}-*"
