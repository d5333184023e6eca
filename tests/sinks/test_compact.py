"""Compaction of Parquet folders, Delta and Iceberg tables: fewer files, the same rows, progress kept."""

from __future__ import annotations

import threading

import pyarrow.dataset as ds
from typer.testing import CliRunner

from nlpstream.jobs.cli import app
from nlpstream.sinks import DeltaSink, IcebergSink, OutputRow, ParquetSink
from nlpstream.sinks import compact as compact_mod
from nlpstream.sinks.compact import compact_delta, compact_iceberg, compact_parquet

DAY_MS = 1764374400000  # 2025-11-29T00:00:00Z


def rows(partition, start, end, day=0):
    return [OutputRow("t", partition, o, f"m{partition}-{o}", "x", "neutral", 0.5, DAY_MS + day * 86_400_000 + o,
                      DAY_MS, "m") for o in range(start, end)]


def fill(sink, flushes=12, per=25):
    for i in range(flushes):
        for p in range(2):
            sink.write(rows(p, i * per, (i + 1) * per))
        sink.flush()


def read_pairs(table):
    return sorted(zip(table.column("partition").to_pylist(), table.column("offset").to_pylist()))


def test_parquet_folder_compaction_is_atomic_for_readers(tmp_path):
    out = tmp_path / "out"
    sink = ParquetSink(str(out))
    fill(sink)
    expected = read_pairs(ds.dataset(str(out), partitioning="hive").to_table())
    before = len(list(out.glob("topic=t/date=*/part-*.parquet")))
    seen: list[int] = []
    stop = threading.Event()

    def reader():  # lists and reads the folder over and over while compaction runs
        while not stop.is_set():
            try:
                seen.append(ds.dataset(str(out), partitioning="hive").to_table().num_rows)
            except (FileNotFoundError, OSError):
                seen.append(-1)  # a file listed before the swap is gone when read: an error, never wrong rows

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        result = compact_parquet(str(out), None, target_rows=200)
    finally:
        stop.set()
        thread.join()
    after = sorted(out.glob("topic=t/date=*/part-*.parquet"))
    assert result.files_before == before == 24 and result.files_after == len(after) == 4  # 300 rows a partition
    assert read_pairs(ds.dataset(str(out), partitioning="hive").to_table()) == expected
    assert seen and {n for n in seen if n >= 0} == {600}, f"a reader saw {set(seen)} rows"
    assert not list(out.glob("topic=t/.compact-*")) and not list(out.glob("topic=t/date=*/.*"))
    # the job resumes and guards zombies from the merged names as before
    assert ParquetSink(str(out)).last_offset("t", 0) == 299
    again = ParquetSink(str(out), skip_written=True)
    again.write(rows(0, 290, 310))
    assert [(f.key.first_offset, f.key.last_offset) for f in again.flush()] == [(300, 309)]


def test_a_file_finished_during_compaction_is_kept(tmp_path, monkeypatch):
    out = tmp_path / "out"
    sink = ParquetSink(str(out))
    fill(sink, flushes=4)
    real = compact_mod.exchange

    def late_then_swap(a, b):  # the stream job finishes a late file just before the swap
        late = ParquetSink(str(out))
        late.write(rows(1, 500, 510))
        late.flush()
        real(a, b)

    monkeypatch.setattr(compact_mod, "exchange", late_then_swap)
    compact_parquet(str(out), None, target_rows=1000)
    pairs = read_pairs(ds.dataset(str(out), partitioning="hive").to_table())
    assert len(pairs) == len(set(pairs)) == 4 * 50 + 10


def test_delta_and_iceberg_compaction_keep_rows_and_progress(tmp_path):
    import polars as pl
    from deltalake import DeltaTable
    from pyiceberg.catalog import load_catalog

    delta = DeltaSink(str(tmp_path / "delta"))
    fill(delta)
    files_before = len(DeltaTable(str(tmp_path / "delta")).file_uris())
    result = compact_delta(str(tmp_path / "delta"), ["2025-11-29"])
    table = DeltaTable(str(tmp_path / "delta"))
    assert files_before == 12 and result.files_before == 12 and len(table.file_uris()) == result.files_after == 1
    assert len(pl.read_delta(str(tmp_path / "delta"))) == 600
    assert [table.transaction_version(f"nlpstream:t:{p}") for p in range(2)] == [299, 299]

    catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path / 'cat.db'}", "warehouse": f"file://{tmp_path / 'wh'}"}
    ice = IcebergSink(catalog, "nlp.out")
    ice.check()
    fill(ice)
    result = compact_iceberg(catalog, "nlp.out", None)
    t = load_catalog("default", **catalog).load_table("nlp.out")
    assert result.files_before == 12 and result.files_after == 1 and len(t.inspect.files()) == 1
    assert read_pairs(t.scan().to_arrow()) == [(p, o) for p in range(2) for o in range(300)]
    assert IcebergSink(catalog, "nlp.out").last_offset("t", 1) == 299


def test_compact_command(tmp_path):
    out = tmp_path / "out"
    fill(ParquetSink(str(out)), flushes=3)
    runner = CliRunner()
    result = runner.invoke(app, ["compact", "--output", str(out), "--date", "2025-11-29"])
    assert result.exit_code == 0, result.output
    assert '"files_before": 6' in result.output and '"files_after": 2' in result.output
    result = runner.invoke(app, ["compact", "--output", "s3://bucket/prefix"])
    assert result.exit_code == 1 and result.output.startswith("error: ") and "delta or iceberg" in result.output
