"""Table sinks: Delta Lake and Apache Iceberg, exactly-once with the Kafka progress in the commit.

Same contract as :class:`~nlpstream.sinks.parquet.ParquetSink`: ``write``
buffers, ``flush`` makes every buffered row durable (one table commit) or
raises :class:`SinkWriteError` with the buffer kept, ``last_offset`` tells
where a partition's rows end, ``discard`` drops a revoked partition's rows.

The progress travels inside the commit that adds the rows, so the table
alone says what it holds:

- **Delta** (delta-rs): each commit carries one application transaction per
  Kafka partition, app id ``nlpstream:<topic>:<partition>``, version = the
  last offset committed. Two writers that commit the same app id from the
  same table version conflict (delta-rs refuses the second), so a zombie
  worker racing the partition's new owner loses, reloads, and finds its rows
  already there.
- **Iceberg** (pyiceberg): each append's snapshot summary carries
  ``nlpstream.offset.<topic>.<partition>`` for every partition the table has
  seen, and the catalog commits by compare-and-swap on the current snapshot:
  a writer whose view is stale is refused, reloads and retries.

Before each commit the sink reloads the table, drops buffered rows at or
below a partition's committed offset (a zombie's, or rows redelivered after a
crash), and retries a refused commit a few times with the fresh state.
Readers only ever see whole commits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from nlpstream.sinks import metrics
from nlpstream.sinks.errors import SinkError, SinkWriteError
from nlpstream.sinks.naming import FileKey
from nlpstream.sinks.parquet import RowBuffer, WrittenFile
from nlpstream.sinks.chunks import dates, file_table, runs
from nlpstream.sinks.schema import arrow_schema

log = logging.getLogger(__name__)

PARTITION_COLUMNS = ("topic", "date")
_COMMIT_TRIES = 5


def table_schema(include_text: bool = True, heads: Sequence[str] = ()) -> pa.Schema:
    """The table's columns: the file columns, then the ``topic`` and ``date`` partition columns."""
    schema = arrow_schema(include_text, heads)
    return schema.append(pa.field("topic", pa.string(), nullable=False)).append(pa.field("date", pa.string(), nullable=False))


def rows_table(rows: pa.Table, include_text: bool) -> pa.Table:
    """Sorted chunk rows (:mod:`nlpstream.sinks.chunks`) -> Arrow table with :func:`table_schema`."""
    table = file_table(rows, include_text)
    table = table.append_column(pa.field("topic", pa.string(), nullable=False), rows["topic"])
    return table.append_column(pa.field("date", pa.string(), nullable=False), dates(rows))


def _ranges(rows: pa.Table) -> list[WrittenFile]:
    """What one commit holds, per (topic, partition, date): reported like files (summary, logs)."""
    out = []
    for run in runs(rows):
        key = FileKey(run.topic, run.date, run.partition, run.first_offset, run.last_offset)
        out.append(WrittenFile(key=key, path=f"{key.folder}[{key.first_offset}..{key.last_offset}]",
                               rows=run.table.num_rows))
    return out


class _TableSink(RowBuffer):
    """Buffering, ordering and zombie filtering shared by the table formats."""

    format = "table"

    def __init__(self, url: str, include_text: bool = True, heads: Sequence[str] = ()) -> None:
        self.url = url
        self.include_text = include_text
        self.heads = tuple(heads)
        super().__init__()

    # -- sink protocol (write, buffered, discard: RowBuffer) ---------------
    def remove_temp_files(self, topic: str, partition: int) -> int:
        """Nothing to remove: data files of a commit that never happened are invisible (vacuum / orphan cleanup)."""
        return 0

    def close(self) -> None:
        self.flush()

    def flush_sealed(self) -> list[WrittenFile]:
        """One commit with every sealed row not yet in the table, and the progress of their partitions."""
        rows = self._take_sealed()
        if rows is None:
            return []
        last_error: Exception | None = None
        for attempt in range(_COMMIT_TRIES):
            try:
                state = self._load()
                fresh = self._fresh(state, rows)
                if fresh.num_rows < rows.num_rows:
                    dropped = rows.num_rows - fresh.num_rows
                    metrics.ROWS_ALREADY_WRITTEN.inc(dropped)
                    log.warning("%d buffered rows are already in the %s table (another worker or an earlier run "
                                "committed them); not writing them again", dropped, self.format)
                if not fresh.num_rows:
                    self._keep_sealed([])
                    return []
                progress = {(run.topic, run.partition): run.last_offset for run in runs(fresh, by_day=False)}
                with metrics.FLUSH_SECONDS.time():
                    self._commit(state, rows_table(fresh, self.include_text), progress)
            except _Conflict as exc:  # someone committed in between: reload and filter again
                last_error = exc
                log.info("%s commit conflicted (try %d of %d), reloading: %s", self.format, attempt + 1,
                         _COMMIT_TRIES, exc)
                time.sleep(0.05 * (attempt + 1))
                continue
            except SinkError:
                metrics.WRITE_ERRORS.inc()
                raise
            except Exception as exc:  # noqa: BLE001 - storage, catalog, schema: retried by the job, buffer kept
                metrics.WRITE_ERRORS.inc()
                raise SinkWriteError(f"cannot commit to the {self.format} table {self.url}: "
                                     f"{type(exc).__name__}: {exc}") from exc
            metrics.ROWS_WRITTEN.inc(fresh.num_rows)
            metrics.FILES_WRITTEN.inc()
            self._keep_sealed([])
            return _ranges(fresh)
        metrics.WRITE_ERRORS.inc()
        raise SinkWriteError(f"the {self.format} table {self.url} kept refusing the commit "
                             f"({_COMMIT_TRIES} conflicts in a row): {last_error}")

    def _fresh(self, state: Any, rows: pa.Table) -> pa.Table:
        """The sorted rows above their partition's committed offset."""
        pieces = []
        for run in runs(rows, by_day=False):
            committed = self._committed(state, run.topic, run.partition)
            pieces.append(run.table.filter(pc.greater(run.table["offset"], committed)))
        return pa.concat_tables(pieces) if pieces else rows.slice(0, 0)

    def last_offset(self, topic: str, partition: int) -> int | None:
        """The partition's last offset committed to the table, or None."""
        value = self._committed(self._load(), topic, partition)
        return None if value < 0 else value

    # -- per format -----------------------------------------------------------
    def _load(self) -> Any:
        raise NotImplementedError

    def _committed(self, state: Any, topic: str, partition: int) -> int:
        """Last offset committed for the partition in ``state``; -1 when none."""
        raise NotImplementedError

    def _commit(self, state: Any, table: pa.Table, progress: dict[tuple[str, int], int]) -> None:
        raise NotImplementedError


def _require(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise SinkError(f"output format {extra} needs the '{module}' package: pip install 'nlpstream[{extra}]'")


class _Conflict(Exception):
    """A concurrent commit won; reload and try again."""


def _exists(probe: Any, missing: type[BaseException]) -> bool:
    """False when ``probe()`` raises ``missing``, True when it returns."""
    try:
        probe()
    except missing:
        return False
    return True


def _check_columns(url: str, found: pa.Schema, expected: pa.Schema, fmt: str) -> None:
    have = {f.name: f.type for f in found}
    want = {f.name: f.type for f in expected}
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    if missing or extra:
        raise SinkError(f"the {fmt} table {url} does not match this job's output: "
                        + "; ".join(filter(None, [f"missing columns {missing}" if missing else "",
                                                  f"unexpected columns {extra}" if extra else ""]))
                        + " (another model's heads, or --no-text?); write to a new table")


class DeltaSink(_TableSink):
    """A Delta Lake table (local folder or object store), partitioned by ``topic`` and ``date``."""

    format = "delta"

    def __init__(self, url: str, include_text: bool = True, heads: Sequence[str] = (),
                 storage_options: dict[str, str] | None = None) -> None:
        super().__init__(url, include_text, heads)
        self.storage_options = storage_options or None

    @staticmethod
    def app_id(topic: str, partition: int) -> str:
        return f"nlpstream:{topic}:{partition}"

    def check(self) -> None:
        """SinkError when deltalake is missing or an existing table's columns differ from this job's."""
        _require("deltalake", "delta")
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            table = DeltaTable(self.url, storage_options=self.storage_options)
        except TableNotFoundError:
            return
        except Exception as exc:  # noqa: BLE001 - unreachable store, bad credentials
            raise SinkError(f"cannot open the delta table {self.url}: {type(exc).__name__}: {exc}") from exc
        _check_columns(self.url, pa.schema(table.schema().to_arrow()), table_schema(self.include_text, self.heads),
                       "delta")

    def _load(self) -> Any:
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(self.url, storage_options=self.storage_options)
        except TableNotFoundError:
            return None

    def _committed(self, state: Any, topic: str, partition: int) -> int:
        if state is None:
            return -1
        version = state.transaction_version(self.app_id(topic, partition))
        return -1 if version is None else int(version)

    def _commit(self, state: Any, table: pa.Table, progress: dict[tuple[str, int], int]) -> None:
        from deltalake import CommitProperties, Transaction, write_deltalake
        from deltalake.exceptions import CommitFailedError

        txns = [Transaction(self.app_id(t, p), offset) for (t, p), offset in sorted(progress.items())]
        try:
            write_deltalake(state if state is not None else self.url, table, mode="append",
                            partition_by=list(PARTITION_COLUMNS), storage_options=self.storage_options,
                            commit_properties=CommitProperties(app_transactions=txns,
                                                               custom_metadata={"writer": "nlpstream"}))
        except CommitFailedError as exc:
            raise _Conflict(str(exc)) from exc


OFFSET_PREFIX = "nlpstream.offset."


class IcebergSink(_TableSink):
    """An Iceberg table in a pyiceberg catalog, partitioned by ``topic`` and ``date`` (identity)."""

    format = "iceberg"

    def __init__(self, catalog: dict[str, Any], table: str, include_text: bool = True,
                 heads: Sequence[str] = ()) -> None:
        super().__init__(table, include_text, heads)
        self.catalog_properties = dict(catalog)
        self.identifier = table
        self._catalog: Any = None

    def _catalog_(self) -> Any:
        if self._catalog is None:
            from pyiceberg.catalog import load_catalog

            props = dict(self.catalog_properties)
            name = str(props.pop("name", "default"))
            self._catalog = load_catalog(name, **props)
        return self._catalog

    def check(self) -> None:
        """Create the namespace and table when missing; SinkError when the catalog is unusable or the
        existing table's columns differ from this job's."""
        _require("pyiceberg", "iceberg")
        try:
            self._ensure_table()
        except SinkError:
            raise
        except Exception as exc:  # noqa: BLE001 - catalog unreachable, refused, bad properties
            raise SinkError(f"cannot open the iceberg table {self.identifier}: {type(exc).__name__}: {exc}") from exc

    def _ensure_table(self) -> Any:
        from pyiceberg.exceptions import (NamespaceAlreadyExistsError, NoSuchNamespaceError, NoSuchTableError,
                                          TableAlreadyExistsError)

        catalog = self._catalog_()
        if "." not in self.identifier:
            raise SinkError(f"iceberg table {self.identifier!r} must be 'namespace.table'")
        namespace = self.identifier.rsplit(".", 1)[0]
        try:
            table = catalog.load_table(self.identifier)
        except NoSuchTableError:
            # workers that start together race to create both: a catalog may refuse the loser with its own
            # error (a SQL catalog's unique constraint) instead of "already exists"; what it created is used
            try:
                catalog.create_namespace(namespace)
            except NamespaceAlreadyExistsError:
                pass
            except Exception:
                if not _exists(lambda: catalog.load_namespace_properties(namespace), NoSuchNamespaceError):
                    raise
                log.info("iceberg namespace %s was created by another worker meanwhile", namespace)
            schema = table_schema(self.include_text, self.heads)
            created = None
            try:
                created = catalog.create_table(self.identifier, schema=schema)
            except TableAlreadyExistsError:
                pass
            except Exception:
                if not _exists(lambda: catalog.load_table(self.identifier), NoSuchTableError):
                    raise
                log.info("iceberg table %s was created by another worker meanwhile", self.identifier)
            if created is not None:  # its creator partitions it (not the loser of a race)
                with created.update_spec() as spec:
                    spec.add_identity("topic")
                    spec.add_identity("date")
            table = catalog.load_table(self.identifier)
        expected = table_schema(self.include_text, self.heads)
        found = table.schema().as_arrow()
        _check_columns(self.identifier, found, expected, "iceberg")
        return table

    def _load(self) -> Any:
        from pyiceberg.exceptions import NoSuchTableError

        try:
            return self._catalog_().load_table(self.identifier)
        except NoSuchTableError:
            return self._ensure_table()

    @staticmethod
    def progress_of(table: Any) -> dict[str, str]:
        snapshot = table.current_snapshot()
        if snapshot is None or snapshot.summary is None:
            return {}
        return {k: v for k, v in snapshot.summary.additional_properties.items() if k.startswith(OFFSET_PREFIX)}

    def _committed(self, state: Any, topic: str, partition: int) -> int:
        value = self.progress_of(state).get(f"{OFFSET_PREFIX}{topic}.{partition}")
        return -1 if value is None else int(value)

    def _commit(self, state: Any, table: pa.Table, progress: dict[tuple[str, int], int]) -> None:
        from pyiceberg.exceptions import CommitFailedException

        summary = self.progress_of(state)  # every partition's progress travels in every snapshot
        summary.update({f"{OFFSET_PREFIX}{t}.{p}": str(offset) for (t, p), offset in progress.items()})
        arrow = table.cast(state.schema().as_arrow())
        try:
            state.append(arrow, snapshot_properties=summary)
        except CommitFailedException as exc:
            raise _Conflict(str(exc)) from exc
