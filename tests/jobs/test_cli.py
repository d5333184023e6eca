"""The console script as users run it (real subprocesses, real files)."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import read_output

pytestmark = pytest.mark.model
CLI = [sys.executable, "-m", "nlpstream.jobs.cli"]


def run(args, **kw):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=600, **kw)


def test_classify_reads_stdin_and_prints_json_lines():
    proc = run(["classify", "--devices", "cpu", "--probs"],
               input="I love it, thank you!\n\nThe order never arrived and support ignores me.\n")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["label"] for r in rows] == ["positive", "negative"]
    assert set(rows[0]["probs"]) == {"negative", "neutral", "positive"}


def test_backfill_jsonl_csv_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"id": f"j{i}", "text": f"Great service, thanks {i}!"})
                                                for i in range(5)) + "\n")
    (tmp_path / "b.csv").write_text("id,text\nc1,The app crashes every time\nc2,What time do you open?\n")
    pq.write_table(pa.table({"body": ["Shares plunged on the warning", ""], "id": ["p1", "p2"]}), tmp_path / "c.parquet")
    out = tmp_path / "out"
    proc = run(["backfill", "--input", str(tmp_path / "a.jsonl"), "--input", str(tmp_path / "b.csv"),
                "--output", str(out), "--devices", "cpu"])
    assert proc.returncode == 0, proc.stderr
    proc = run(["backfill", "--input", str(tmp_path / "c.parquet"), "--output", str(out), "--text-field", "body",
                "--devices", "cpu"])
    assert proc.returncode == 0, proc.stderr
    assert "1 skipped" in proc.stderr
    table = read_output(out)
    assert sorted(table.column("id").to_pylist()) == ["c1", "c2", "j0", "j1", "j2", "j3", "j4", "p1"]
    topics = dict(zip(table.column("id").to_pylist(), table.column("topic").to_pylist()))
    assert (topics["j0"], topics["c1"], topics["p1"]) == ("a", "b", "c")
    # a rerun replaces its own files instead of adding rows
    assert run(["backfill", "--input", str(tmp_path / "b.csv"), "--output", str(out), "--devices", "cpu"]).returncode == 0
    assert read_output(out).num_rows == 8
    bad = run(["backfill", "--input", str(tmp_path / "c.parquet"), "--output", str(out / "q"), "--devices", "cpu"])
    assert bad.returncode == 2 and "no column 'text'" in bad.stderr


def test_invalid_flags_are_clear_errors(tmp_path):
    proc = run(["stream", "--topic", "x", "--flush-interval", "-1"])
    assert proc.returncode == 2 and "output.flush_interval" in proc.stderr
    proc = run(["stream"])
    assert proc.returncode == 2 and "no topic" in proc.stderr
    proc = run(["kafka-local", "status", "--data-dir", str(tmp_path / "none")])
    assert proc.returncode == 1 and json.loads(proc.stdout)["running"] is False


def test_unreachable_brokers_and_taken_port_are_clear_errors(tmp_path):
    import socket

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    proc = run(["stream", "--topic", "x", "--bootstrap-servers", f"127.0.0.1:{dead}", "--devices", "cpu",
                "--metrics-port", "0", "--output", str(tmp_path / "out")])
    assert proc.returncode == 1, proc.stderr
    assert f"error: cannot create the dead-letter producer: cannot connect to Kafka at 127.0.0.1:{dead}" in proc.stderr
    assert "Traceback" not in proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run(["stream", "--topic", "x", "--bootstrap-servers", f"127.0.0.1:{dead}", "--devices", "cpu",
                    "--metrics-port", str(port), "--output", str(tmp_path / "out")])
    assert proc.returncode == 1, proc.stderr
    assert f"error: cannot serve /metrics on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.kafka
def test_demo_runs_end_to_end(tmp_path):
    proc = run(["demo", "--messages", "150", "--output", str(tmp_path / "demo"), "--devices", "cpu"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "labeled (in Parquet)" in proc.stdout
    table = read_output(tmp_path / "demo")
    produced_bad = 1  # one bad record every 97 messages
    assert table.num_rows == 150 - produced_bad
    assert len(list((tmp_path / "demo").glob("_alerts-*.jsonl"))) == 1
