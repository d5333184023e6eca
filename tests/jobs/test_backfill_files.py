"""File backfill on the local executor with the fake engine: inputs of every kind, pieces, rejects, resume
from leftovers, metrics while running, progress, and input errors."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from nlpstream.jobs.backfill import BackfillError, run_backfill
from nlpstream.jobs.config import BackfillConfig, load_config
from tests.conftest import read_output
from tests.inference.fakes import FakeRunner, fake_engine


def _cfg(out: Path | str, **extra: object) -> BackfillConfig:
    return load_config(BackfillConfig, None, {"output.output": str(out), **extra})


def _jsonl(path: Path, n: int, prefix: str, blank_every: int = 0) -> None:
    lines = []
    for i in range(n):
        text = "" if blank_every and i % blank_every == 0 else f"{prefix} text number {i}"
        lines.append(json.dumps({"id": f"{prefix}{i}", "text": text}))
    path.write_text("\n".join(lines) + "\n")


def _rejects(out: Path) -> pa.Table:
    return ds.dataset(str(out / "_rejects"), format="parquet", partitioning="hive").to_table()


class Recorder:
    """rich's Progress calls the backfill makes."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.done = 0

    def add_task(self, description: str, total: int | None = None) -> int:
        self.total = total
        return 0

    def update(self, task: int, advance: int = 0) -> None:
        self.done += advance


def test_folders_globs_urls_and_formats_are_read_in_pieces_with_rejects_beside_the_output(tmp_path):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "_ignored").mkdir()
    _jsonl(src / "a.jsonl", 250, "a", blank_every=100)  # rows 0, 100, 200 blank
    _jsonl(src / "nested" / "b.jsonl", 30, "b")
    _jsonl(src / "_ignored" / "c.jsonl", 5, "c")  # underscore folders are skipped like readers skip them
    (src / "notes.txt").write_text("not an input")
    table = pa.table({"body": [f"parquet row {i}" if i != 7 else None for i in range(120)],
                      "id": [f"p{i}" for i in range(120)]})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=50)
    (tmp_path / "d.csv").write_text("id,text\nd0,first csv row\nd1,123\nd2,   \n")
    mem = fsspec.filesystem("memory")
    with mem.open("/bf-test/m1.jsonl", "w") as fh:
        fh.write("\n".join(json.dumps({"id": f"m{i}", "text": f"memory row {i}"}) for i in range(12)) + "\n")
    out = tmp_path / "out"
    engine, _ = fake_engine(["cpu"], precision="fp32")
    progress = Recorder()
    with engine:
        summary = run_backfill(_cfg(out, rows_per_file=40), [str(src), str(tmp_path / "*.csv"),
                                                              "memory://bf-test/*.jsonl"], engine, progress)
        progress_pq = Recorder()
        summary_pq = run_backfill(_cfg(out, rows_per_file=40, text_field="body"), [str(tmp_path / "p.parquet")],
                                  engine, progress_pq)
    got = read_output(out)
    ids = got.column("id").to_pylist()
    assert len(ids) == len(set(ids))
    expected = ({f"a{i}" for i in range(250) if i % 100} | {f"b{i}" for i in range(30)} | {"d0", "d1"}
                | {f"m{i}" for i in range(12)} | {f"p{i}" for i in range(120) if i != 7})
    assert set(ids) == expected
    assert summary.rows == 247 + 30 + 2 + 12 and summary.skipped == 4 and summary_pq.rows == 119
    # the bar's total: rows of local files (Parquet footers, lines), unknown with an object store among the inputs
    assert progress.total is None and progress.done == 250 + 30 + 3 + 12
    assert progress_pq.total == progress_pq.done == 120
    # offsets are row numbers of each file; pieces of 40 rows -> files of at most 40 rows, named by row range
    rows = {r["id"]: r for r in got.to_pylist()}
    assert (rows["a249"]["offset"], rows["a249"]["topic"], rows["b3"]["topic"]) == (249, "a", "b")
    names = sorted(p.name for p in (out / "topic=a").rglob("part-*.parquet"))
    assert names[0] == "part-00000-00000000000000000001-00000000000000000039.parquet"  # row 0 is a reject
    assert len(names) == 7  # ceil(250 / 40)
    # rejects: id, source position and reason, outside the folders readers scan
    rejects = _rejects(out).to_pylist()
    by_id = {r["id"]: r for r in rejects}
    assert set(by_id) == {"a0", "a100", "a200", "d2", "p7"}
    assert by_id["a100"]["offset"] == 100 and by_id["a100"]["reason"] == "blank_text"
    assert by_id["a100"]["source"] == str(src / "a.jsonl")
    assert by_id["p7"]["reason"] == "missing_text" and by_id["p7"]["offset"] == 7
    assert "_rejects" not in {c for c in got.column_names}


def test_a_rerun_skips_finished_pieces_and_replaces_what_unfinished_ones_left(tmp_path):
    src = tmp_path / "in.jsonl"
    _jsonl(src, 100, "r", blank_every=30)
    out = tmp_path / "out"
    engine, _ = fake_engine(["cpu"], precision="fp32")
    with engine:
        first = run_backfill(_cfg(out, rows_per_file=25), [src], engine)
        assert first.pieces == 4
        # a killed run: piece 25..49 lost its marker midway, left a temp file and a stray rejects file
        markers = sorted((out / "_backfill" / "topic=in").iterdir())
        markers[1].unlink()
        day = next((out / "topic=in").iterdir())
        (day / ".part-00000-00000000000000000025-00000000000000000049.parquet.tmp").write_bytes(b"half")
        second = run_backfill(_cfg(out, rows_per_file=25), [src], engine)
    assert second.pieces == 1 and second.already_done == 75 and second.rows == 24  # row 30 is blank
    ids = read_output(out).column("id").to_pylist()
    assert sorted(ids) == sorted(f"r{i}" for i in range(100) if i % 30)
    assert sorted(_rejects(out).column("id").to_pylist()) == ["r0", "r30", "r60", "r90"]
    assert not list(out.rglob(".*.tmp"))


def test_metrics_are_served_with_the_stream_job_names_while_it_runs(tmp_path):
    from nlpstream.jobs import metrics

    src = tmp_path / "live.jsonl"
    _jsonl(src, 400, "x", blank_every=50)
    port = metrics.serve_metrics("127.0.0.1", 0)
    engine, _ = fake_engine(["cpu"], precision="fp32", runners={"cpu": FakeRunner("torch-float32", "cpu",
                                                                                 delay_s=0.02)},
                            max_batch_size=8)
    seen: list[float] = []
    with engine:
        worker = threading.Thread(target=run_backfill, args=(_cfg(tmp_path / "out", rows_per_file=50), [src],
                                                             engine), kwargs={"batch_size": 16})
        worker.start()
        while worker.is_alive():
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            for line in body.splitlines():
                if line.startswith('nlpstream_messages_labeled_total{topic="live"}'):
                    seen.append(float(line.split()[-1]))
            time.sleep(0.2)
        worker.join()
    assert any(0 < v < 392 for v in seen), seen  # rows counted while the job still ran
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'nlpstream_messages_labeled_total{topic="live"} 392.0' in body
    assert 'nlpstream_messages_dead_lettered_total{reason="blank_text",topic="live"} 8.0' in body
    assert 'nlpstream_messages_consumed_total{topic="live"} 400.0' in body


def test_input_mistakes_are_clear_errors(tmp_path):
    engine, _ = fake_engine(["cpu"], precision="fp32")
    out = tmp_path / "out"
    (tmp_path / "ok.jsonl").write_text('{"id": "a", "body": "hi"}\n')
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n')
    (tmp_path / "x.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "missing.jsonl"): "input not found",
        str(tmp_path / "ok.jsonl"): "has no column 'text' (columns: id, body)",
        str(tmp_path / "x.txt"): "unsupported input",
        str(tmp_path / "empty"): "holds no .jsonl, .csv or .parquet file",
        str(tmp_path / "nothing-*.parquet"): "matches no .jsonl, .csv or .parquet file",
        str(tmp_path / "bad.jsonl"): "cannot read",
    }
    with engine:
        for spec, message in cases.items():
            with pytest.raises(BackfillError, match=message.replace("(", r"\(").replace(")", r"\)")):
                run_backfill(_cfg(out), [spec], engine)
    assert not read_output_rows(out)


def read_output_rows(out: Path) -> int:
    files = [p for p in out.rglob("part-*.parquet") if "_rejects" not in p.parts] if out.exists() else []
    return sum(pq.read_metadata(p).num_rows for p in files)


def test_further_heads_reach_the_output(tmp_path):
    from nlpstream.inference import Prediction

    class TwoHeads:
        """The engine protocol with a second head ("topic") on every prediction."""

        model_name = "two-heads"

        def classify(self, texts: list[str]) -> list[Prediction]:
            return [Prediction("positive", 0.75, {"positive": 0.75},
                               heads={"topic": Prediction("billing" if "bill" in t else "other", 0.5, {})})
                    for t in texts]

    src = tmp_path / "h.jsonl"
    src.write_text('{"id": "1", "text": "my bill is wrong"}\n{"id": "2", "text": "hello"}\n')
    run_backfill(_cfg(tmp_path / "out"), [src], TwoHeads())
    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert (rows["1"]["topic_label"], rows["2"]["topic_label"], rows["1"]["topic_score"]) == ("billing", "other", 0.5)
