"""Backfill file inputs: files, folders, globs and fsspec URLs, read as bounded pieces of rows.

``expand_inputs`` turns ``--input`` values into a fixed, ordered list of
:class:`InputFile` (each with the hive ``topic`` and the ``partition`` its
rows are written under); ``read_pieces`` streams one file through pyarrow's
pull-based readers (``ParquetFile.iter_batches`` a row group at a time,
``open_json`` and ``open_csv`` a block at a time), which read nothing
ahead of what is pulled. and cuts the stream into pieces of exactly ``piece_rows`` rows
(the last one shorter). A piece's rows are numbered from 0 in file order:
the row number is the output ``offset``, so a piece is the same row range on
every run. Resident memory is bounded by a piece plus the reader's block, not
by the size of the file.
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
from fsspec.implementations.local import LocalFileSystem

FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".parquet": "parquet",
           ".pq": "parquet"}
_GLOB_CHARS = "*?["


class BackfillError(Exception):
    """The backfill cannot run: an input is missing, unreadable or lacks the text column; a broker or a Ray
    cluster cannot be reached; a time range holds no record. The message is one line for the user."""


@dataclass(frozen=True, slots=True)
class InputFile:
    """One input file and where its rows go: ``topic=<topic>/``, ``partition``, offset = row number."""

    url: str  # as the user sees it (local path, or protocol://...)
    path: str  # inside ``fs``
    format: str  # parquet, json or csv
    topic: str
    partition: int
    fs: Any = None  # the fsspec file system

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


@dataclass(frozen=True, slots=True)
class Piece:
    """``table`` holds rows ``first`` .. ``first + num_rows - 1`` of one input (columns: the text, and the id
    and ``event_time`` where the input has them)."""

    topic: str
    partition: int
    first: int
    source: str
    table: pa.Table

    @property
    def last(self) -> int:
        return self.first + self.table.num_rows - 1


def safe_name(stem: str) -> str:
    """A hive folder value from a file stem (letters, digits, ``._-``)."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)
    return cleaned or "backfill"


def _format_of(path: str) -> str | None:
    return FORMATS.get(posixpath.splitext(path)[1].lower())


def _hidden(path: str, root: str) -> bool:
    rel = path[len(root):].lstrip("/") if path.startswith(root) else posixpath.basename(path)
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def _display(fs: Any, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def expand_inputs(specs: list[str], topic_name: str | None = None) -> list[InputFile]:
    """The files named by ``specs`` (file, folder, glob or fsspec URL), in argument order, each folder and
    glob sorted, duplicates dropped.

    Folders are searched recursively for .jsonl/.json/.ndjson, .csv and
    .parquet/.pq files, skipping names that start with ``.`` or ``_`` (as
    Spark and pyarrow do). ``topic`` is ``topic_name`` when given (then
    ``partition`` is the file's position in the list), else the file's stem
    (then ``partition`` counts files with the same stem). Raises
    BackfillError for an input that does not exist, matches no file or has
    an unsupported extension.
    """
    found: list[tuple[Any, str]] = []
    for spec in specs:
        try:
            fs, path = fsspec.core.url_to_fs(spec)
        except (ImportError, ValueError) as exc:
            raise BackfillError(f"input {spec}: {exc}") from exc
        try:
            if any(c in path for c in _GLOB_CHARS):
                matches = sorted(fs.glob(path))
                paths = []
                for m in matches:
                    paths.extend(_folder_files(fs, m) if fs.isdir(m) else [m])
                paths = [p for p in paths if _format_of(p)]
                if not paths:
                    raise BackfillError(f"input {spec} matches no .jsonl, .csv or .parquet file")
            elif fs.isdir(path):
                paths = _folder_files(fs, path)
                if not paths:
                    raise BackfillError(f"input folder {spec} holds no .jsonl, .csv or .parquet file")
            elif fs.isfile(path):
                if _format_of(path) is None:
                    raise BackfillError(f"unsupported input {spec}: expected .jsonl, .csv or .parquet")
                paths = [path]
            else:
                raise BackfillError(f"input not found: {spec}")
        except OSError as exc:  # permission denied, unreachable object store
            raise BackfillError(f"cannot read input {spec}: {exc}") from exc
        found.extend((fs, p) for p in paths)
    seen: set[str] = set()
    files: list[InputFile] = []
    per_topic: dict[str, int] = {}
    for fs, path in found:
        url = _display(fs, path)
        if url in seen:
            continue
        seen.add(url)
        topic = topic_name or safe_name(posixpath.splitext(posixpath.basename(path))[0])
        partition = len(files) if topic_name else per_topic.get(topic, 0)
        per_topic[topic] = per_topic.get(topic, 0) + 1
        files.append(InputFile(url, path, _format_of(path) or "", topic, partition, fs))
    return files


def _folder_files(fs: Any, folder: str) -> list[str]:
    root = folder.rstrip("/")
    return sorted(p for p in fs.find(root) if _format_of(p) and not _hidden(p, root))


@contextlib.contextmanager
def open_reader(f: InputFile, text_field: str, id_field: str, block_bytes: int = 8 << 20,
                batch_rows: int = 65_536) -> Iterator[tuple[list[str], Iterator[pa.RecordBatch]]]:
    """The file's column names and a pull-based stream of its record batches (only the text, id and
    ``event_time`` columns), read a Parquet row group or a JSON/CSV block at a time: nothing is read
    ahead of what the caller pulls. Raises BackfillError when it cannot be opened or has no ``text_field``.
    """
    import pyarrow.parquet as pq

    local = isinstance(f.fs, LocalFileSystem)
    handle = None
    try:
        source: Any = f.path if local else (handle := f.fs.open(f.path, "rb"))
        if f.format == "parquet":
            # pre_buffer (pyarrow's default) keeps every row group read so far: RSS grows with the file
            parquet = pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20)
            names = parquet.schema_arrow.names
            wanted = _wanted(names, text_field, id_field)
            batches: Iterator[pa.RecordBatch] = parquet.iter_batches(batch_size=batch_rows, columns=wanted)
        else:
            if f.format == "json":
                reader = pajson.open_json(source, read_options=pajson.ReadOptions(block_size=block_bytes))
            else:
                reader = pacsv.open_csv(source, read_options=pacsv.ReadOptions(block_size=block_bytes),
                                        convert_options=pacsv.ConvertOptions(
                                            column_types={text_field: pa.string(), id_field: pa.string()},
                                            strings_can_be_null=True))
            names = reader.schema.names
            wanted = _wanted(names, text_field, id_field)
            batches = (batch.select(wanted) for batch in reader)
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        if handle is not None:
            handle.close()
        raise BackfillError(f"cannot read {f.url}: {exc}") from exc
    try:
        if text_field not in names:
            raise BackfillError(f"{f.url} has no column {text_field!r} (columns: {', '.join(names)}); "
                                "give the text column with --text-field")
        yield names, batches
    finally:
        if handle is not None:
            handle.close()


def _wanted(names: list[str], text_field: str, id_field: str) -> list[str]:
    return [c for c in dict.fromkeys((text_field, id_field, "event_time")) if c in names]


def check_input(f: InputFile, text_field: str, id_field: str, block_bytes: int = 8 << 20) -> None:
    """BackfillError unless the file can be opened and has ``text_field`` (reads its footer or first block)."""
    with open_reader(f, text_field, id_field, block_bytes):
        pass


def count_rows(f: InputFile) -> int | None:
    """Rows of the file for the progress bar: Parquet from its footer; JSON lines and CSV by counting
    lines of local files (one buffered pass); None where unknown (object stores)."""
    try:
        if f.format == "parquet":
            import pyarrow.parquet as pq

            with f.fs.open(f.path, "rb") as fh:
                return pq.ParquetFile(fh).metadata.num_rows
        if not isinstance(f.fs, LocalFileSystem):
            return None
        lines, last = 0, b"\n"
        with open(f.path, "rb") as fh:
            while chunk := fh.read(8 << 20):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        lines += last != b"\n"
        return max(0, lines - 1) if f.format == "csv" else lines
    except OSError:
        return None


def read_pieces(f: InputFile, text_field: str, id_field: str, piece_rows: int,
                block_bytes: int = 8 << 20) -> Iterator[Piece]:
    """Stream the file as pieces of ``piece_rows`` consecutive rows (the last one may be shorter).

    Raises BackfillError when the file cannot be read (also midway: a
    malformed JSON line, a CSV row with the wrong number of fields).
    """
    pending: list[pa.RecordBatch] = []
    buffered = 0
    first = 0
    with open_reader(f, text_field, id_field, block_bytes, min(piece_rows, 65_536)) as (_, batches):
        try:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                pending.append(batch)
                buffered += batch.num_rows
                while buffered >= piece_rows:
                    table = pa.Table.from_batches(pending)
                    yield Piece(f.topic, f.partition, first, f.url, table.slice(0, piece_rows))
                    rest = table.slice(piece_rows)
                    # no empty slices: each would keep its whole parent batch alive, piece after piece
                    pending, buffered = [b for b in rest.to_batches() if b.num_rows], rest.num_rows
                    first += piece_rows
        except (pa.ArrowInvalid, OSError) as exc:
            raise BackfillError(f"cannot read {f.url} after row {first}: {exc}") from exc
    if buffered:
        yield Piece(f.topic, f.partition, first, f.url, pa.Table.from_batches(pending))
