import os

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from nlpstream.sinks import OutputRow, ParquetSink, SinkWriteError

DAY1 = 1_795_000_000_000  # 2026-11-18 UTC
DAY2 = DAY1 + 86_400_000


def row(topic, partition, offset, ts=DAY1, label="neutral"):
    return OutputRow(topic, partition, offset, f"id-{partition}-{offset}", f"text {offset}", label, 0.9, ts, ts + 5, "m")


def test_hive_layout_reads_back_as_one_table(tmp_path):
    sink = ParquetSink(str(tmp_path))
    sink.write([row("a", 0, i) for i in range(5)] + [row("b", 1, i, DAY2) for i in range(3)])
    files = sink.flush()
    assert len(files) == 2 and sink.buffered == 0
    table = ds.dataset(str(tmp_path), partitioning="hive").to_table()
    assert table.num_rows == 8
    assert {"topic", "date", "id", "text", "label", "score", "partition", "offset", "event_time",
            "processed_at", "model"} <= set(table.column_names)
    one = pq.read_table(files[0].path)
    assert "topic" not in one.column_names and "date" not in one.column_names
    assert sorted(set(table.column("topic").to_pylist())) == ["a", "b"]


def test_runs_by_date_and_offsets_in_names(tmp_path):
    sink = ParquetSink(str(tmp_path))
    sink.write([row("a", 0, 1, DAY1), row("a", 0, 2, DAY1), row("a", 0, 3, DAY2), row("a", 0, 4, DAY1)])
    files = sink.flush()
    assert [(f.key.date, f.key.first_offset, f.key.last_offset) for f in files] == [
        ("2026-11-18", 1, 2), ("2026-11-19", 3, 3), ("2026-11-18", 4, 4)]
    assert sink.last_offset("a", 0) == 4
    assert sink.last_offset("a", 1) is None
    assert sink.last_offset("b", 0) is None


def test_text_column_can_be_dropped(tmp_path):
    sink = ParquetSink(str(tmp_path), include_text=False)
    sink.write([row("a", 0, 1)])
    (f,) = sink.flush()
    assert "text" not in pq.read_table(f.path).column_names


def test_temp_files_are_hidden_and_cleaned(tmp_path):
    sink = ParquetSink(str(tmp_path))
    sink.write([row("a", 0, 1)])
    sink.flush()
    folder = tmp_path / "topic=a" / "date=2026-11-18"
    (folder / ".part-00000-00000000000000000002-00000000000000000009.parquet.tmp").write_bytes(b"partial")
    assert ds.dataset(str(tmp_path), partitioning="hive").to_table().num_rows == 1
    assert sink.last_offset("a", 0) == 1
    assert sink.remove_temp_files("a", 0) == 1
    assert not any(p.name.startswith(".") for p in folder.iterdir())


def test_failing_filesystem_keeps_rows_for_retry(tmp_path, monkeypatch):
    sink = ParquetSink(str(tmp_path))
    sink.write([row("a", 0, i) for i in range(3)])
    real = sink._write_local

    def refuse(*args):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(sink, "_write_local", refuse)
    with pytest.raises(SinkWriteError, match="Read-only"):
        sink.flush()
    assert sink.buffered == 3
    assert sink.last_offset("a", 0) is None
    monkeypatch.setattr(sink, "_write_local", real)
    assert [f.rows for f in sink.flush()] == [3]
    assert sink.last_offset("a", 0) == 2


def test_a_sealed_flush_writes_only_what_was_sealed_while_writes_go_on(tmp_path, monkeypatch):
    """The stream job's flush beside the loop: seal, keep writing, flush the sealed rows; a failure keeps them
    sealed and the next seal adds the newer rows behind them."""
    sink = ParquetSink(str(tmp_path))
    sink.write([row("a", 0, i) for i in range(3)])
    sink.seal()
    sink.write([row("a", 0, 3), row("a", 0, 4)])  # written while the sealed rows are flushed
    assert sink.buffered == 5, "sealed rows count until they are durable"
    real = sink._write_local
    monkeypatch.setattr(sink, "_write_local", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(SinkWriteError, match="No space"):
        sink.flush_sealed()
    assert sink.buffered == 5 and sink.last_offset("a", 0) is None
    monkeypatch.setattr(sink, "_write_local", real)
    sink.seal()  # the retry takes the failed flush's rows and the newer ones
    sink.write([row("a", 0, 5)])
    (f,) = sink.flush_sealed()
    assert (f.key.first_offset, f.key.last_offset, f.rows) == (0, 4, 5) and sink.buffered == 1
    assert sink.discard("a", 0) == 1 and sink.flush() == []


def test_fsspec_memory_filesystem():
    import fsspec

    sink = ParquetSink("memory://nlpstream-test/out")
    sink.write([row("a", 0, i) for i in range(4)])
    (f,) = sink.flush()
    fs = fsspec.filesystem("memory")
    assert fs.exists(f.path)
    assert not [p for p in fs.find("/nlpstream-test/out") if os.path.basename(p).startswith(".")]
    assert sink.last_offset("a", 0) == 3


def test_discard_drops_one_partition(tmp_path):
    sink = ParquetSink(str(tmp_path))
    sink.write([row("a", 0, 1), row("a", 1, 1), row("a", 1, 2)])
    assert sink.discard("a", 1) == 2
    assert [f.key.partition for f in sink.flush()] == [0]


@pytest.mark.parametrize("url", ["local", "memory://nlpstream-zombie/out"])
def test_skip_written_never_writes_offsets_another_worker_holds(tmp_path, url):
    """A zombie (an evicted worker still holding rows) and the partition's new owner write exactly once."""
    from nlpstream.sinks import metrics

    root = str(tmp_path) if url == "local" else url
    owner = ParquetSink(root, skip_written=True)
    zombie = ParquetSink(root, skip_written=True)
    zombie.write([row("a", 0, i) for i in range(40, 70)])  # in hand when it was evicted
    owner.write([row("a", 0, i) for i in range(0, 100)])  # the new owner resumed from the files and read on
    before = metrics.ROWS_ALREADY_WRITTEN._value.get()
    assert [(f.key.first_offset, f.key.last_offset) for f in zombie.flush()] == [(40, 69)]
    written = owner.flush()
    assert [(f.key.first_offset, f.key.last_offset) for f in written] == [(0, 39), (70, 99)]
    assert metrics.ROWS_ALREADY_WRITTEN._value.get() - before == 30
    table = ds.dataset(owner.root, filesystem=owner.fs, partitioning="hive").to_table()
    offsets = sorted(table.column("offset").to_pylist())
    assert offsets == list(range(100))  # every offset once
    assert owner.last_offset("a", 0) == 99
    # everything already held: nothing is written, and a plain sink (backfill reruns) still rewrites
    owner.write([row("a", 0, i) for i in range(10, 20)])
    assert owner.flush() == []
    plain = ParquetSink(root)
    plain.write([row("a", 0, i) for i in range(0, 40)])
    assert [(f.key.first_offset, f.key.last_offset) for f in plain.flush()] == [(0, 39)]


def test_chunks_and_rows_of_interleaved_topics_partitions_and_days_land_sorted_in_their_files(tmp_path):
    """Arrow chunks built from columns and rows given as objects are buffered together; the flush sorts them
    by (topic, partition, offset) and writes one file per run of one day, each holding exactly its name's
    offsets in order; a discarded partition's rows are gone from both kinds."""
    from nlpstream.sinks.chunks import columns_chunk

    sink = ParquetSink(str(tmp_path))
    offsets = [5, 3, 4, 0, 1, 2]  # two batches' worth, out of order across partitions and topics
    topics = ["b", "a", "a", "a", "b", "a"]
    partitions = [0, 1, 1, 0, 0, 0]
    times = [DAY1, DAY1, DAY2, DAY1, DAY1, DAY1]
    sink.write_chunk(columns_chunk(topics, partitions, offsets, [f"i{o}" for o in offsets], [f"t{o}" for o in offsets],
                                   ["pos"] * 6, [0.5] * 6, times, DAY2, "m"))
    sink.write([row("a", 1, 9, DAY2), row("a", 0, 7), row("c", 2, 1)])
    one_topic = columns_chunk("a", [0], [8], ["i8"], ["t8"], ["neg"], [0.25], [DAY1], DAY2, "m")  # every row "a"
    assert one_topic.equals(columns_chunk(["a"], [0], [8], ["i8"], ["t8"], ["neg"], [0.25], [DAY1], DAY2, "m"))
    sink.write_chunk(one_topic)
    assert sink.buffered == 10
    assert sink.discard("c", 2) == 1 and sink.buffered == 9
    files = sink.flush()
    got = {(f.key.topic, f.key.partition, f.key.date, f.key.first_offset, f.key.last_offset): f for f in files}
    assert sorted(got) == [("a", 0, "2026-11-18", 0, 8), ("a", 1, "2026-11-18", 3, 3),
                           ("a", 1, "2026-11-19", 4, 9), ("b", 0, "2026-11-18", 1, 5)]
    for (topic, partition, _, first, last), f in got.items():
        table = pq.read_table(f.path)
        offs = table.column("offset").to_pylist()
        assert offs == sorted(offs) and offs[0] == first and offs[-1] == last
        assert set(table.column("partition").to_pylist()) == {partition}
    a0 = pq.read_table(got[("a", 0, "2026-11-18", 0, 8)].path)
    assert a0.column("offset").to_pylist() == [0, 2, 7, 8]
    assert a0.column("id").to_pylist() == ["i0", "i2", "id-0-7", "i8"]
    assert a0.column("score").to_pylist() == [0.5, 0.5, 0.8999999761581421, 0.25]
    assert a0.schema.field("event_time").type == pq.read_table(got[("b", 0, "2026-11-18", 1, 5)].path).schema.field(
        "event_time").type
    assert sink.buffered == 0 and sink.flush() == []


def test_skip_written_splits_a_chunk_around_a_file_another_worker_wrote(tmp_path):
    other = ParquetSink(str(tmp_path))
    other.write([row("a", 0, o) for o in (3, 4)])
    other.flush()
    sink = ParquetSink(str(tmp_path), skip_written=True)
    sink.write([row("a", 0, o) for o in range(8)])
    files = sink.flush()
    assert [(f.key.first_offset, f.key.last_offset, f.rows) for f in files] == [(0, 2, 3), (5, 7, 3)]
    table = ds.dataset(str(tmp_path), partitioning="hive").to_table()
    assert sorted(table.column("offset").to_pylist()) == list(range(8))


def test_only_low_cardinality_columns_are_dictionary_encoded(tmp_path):
    sink = ParquetSink(str(tmp_path))
    sink.write([row("a", 0, i, label=("neutral", "negative")[i % 2]) for i in range(20)])
    (f,) = sink.flush()
    meta = pq.ParquetFile(f.path).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    assert any("DICTIONARY" in e for e in encodings["label"]) and any("DICTIONARY" in e for e in encodings["model"])
    assert not any("DICTIONARY" in e for e in encodings["text"]) and not any("DICTIONARY" in e for e in encodings["id"])
    assert pq.read_table(f.path).column("label").to_pylist() == [("neutral", "negative")[i % 2] for i in range(20)]
