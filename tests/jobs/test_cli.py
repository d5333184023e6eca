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
    assert bad.returncode == 1 and "no column 'text'" in bad.stderr


def test_invalid_flags_are_clear_errors(tmp_path):
    proc = run(["stream", "--topic", "x", "--flush-interval", "-1"])
    assert proc.returncode == 2 and "output.flush_interval" in proc.stderr
    proc = run(["stream"])
    assert proc.returncode == 2 and "no topic" in proc.stderr
    proc = run(["kafka-local", "status", "--data-dir", str(tmp_path / "none")])
    assert proc.returncode == 1 and json.loads(proc.stdout)["running"] is False


def test_unreachable_brokers_are_waited_for_then_a_clear_error_and_a_taken_port_too(tmp_path):
    import os
    import socket

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    env = dict(os.environ, NLPSTREAM_KAFKA__STARTUP_TIMEOUT="3")
    proc = run(["stream", "--topic", "x", "--bootstrap-servers", f"127.0.0.1:{dead}", "--devices", "cpu",
                "--metrics-port", "0", "--output", str(tmp_path / "out")], env=env)
    assert proc.returncode == 1, proc.stderr
    assert f"waiting for Kafka at 127.0.0.1:{dead}" in proc.stderr  # said in the log while it retries
    assert f"error: cannot connect to Kafka at 127.0.0.1:{dead}" in proc.stderr
    assert "kafka.startup_timeout" in proc.stderr and "Traceback" not in proc.stderr
    assert "compute capability" not in proc.stderr and "agree with fp32" not in proc.stderr  # no model was loaded
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run(["stream", "--topic", "x", "--bootstrap-servers", f"127.0.0.1:{dead}", "--devices", "cpu",
                    "--metrics-port", str(port), "--output", str(tmp_path / "out")], env=env)
    assert proc.returncode == 1, proc.stderr
    assert f"error: cannot serve /metrics on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


MISTAKES = {
    "missing directory": (["--model", "/no/such/dir"], ["'/no/such/dir' not found", "builtin:sentiment",
                                                        "local Hugging Face cache"]),
    "hub id not cached": (["--model", "nosuch/model"], ["'nosuch/model' is not in the local Hugging Face cache",
                                                        "builtin:sentiment", "local Hugging Face model directory"]),
    "no GPU": (["--devices", "cuda"], ["devices='cuda' but no CUDA device is visible", "--devices auto, cpu"]),
    "fp16 on CPU": (["--devices", "cpu", "--precision", "fp16"], ["precision='fp16'", "int8, bf16 or fp32"]),
}


@pytest.mark.parametrize("command", ["stream", "classify", "backfill"])
def test_model_device_and_precision_mistakes_are_one_error_line_exit_1(command, tmp_path):
    """Each mistake, in each command, as a subprocess: one ``error:`` line naming what was given and what works.

    The stream job points at a port nobody listens on with a long start-up
    wait: the mistake must be found before any wait for Kafka.
    """
    import os
    import socket
    import time

    (tmp_path / "in.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    base = {"stream": ["stream", "--topic", "x", "--bootstrap-servers", f"127.0.0.1:{dead}",
                       "--output", str(tmp_path / "out")],
            "classify": ["classify"],
            "backfill": ["backfill", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out")]}[command]
    env = dict(os.environ, HF_HUB_OFFLINE="1", NLPSTREAM_KAFKA__STARTUP_TIMEOUT="300")
    env["CUDA_VISIBLE_DEVICES"] = ""  # the no-GPU case must hold on a GPU machine too
    for name, (args, expected) in MISTAKES.items():
        started = time.monotonic()
        proc = run(base + args, input="hello\n", env=env)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1, f"{command} / {name}: {proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr, f"{command} / {name}: {proc.stderr[-2000:]}"
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1, f"{command} / {name}: {proc.stderr[-2000:]}"
        for part in expected:
            assert part in errors[0], f"{command} / {name}: {part!r} not in {errors[0]!r}"
        assert time.monotonic() - started < 240, "the mistake was found only after waiting for Kafka"


def test_output_that_cannot_work_fails_before_the_model_loads(tmp_path):
    import os

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = dict(os.environ, NLPSTREAM_KAFKA__STARTUP_TIMEOUT="300")
    for command in (["stream", "--topic", "x", "--bootstrap-servers", "127.0.0.1:9"],
                    ["backfill", "--input", str(blocker)]):
        proc = run(command + ["--output", str(blocker / "out"), "--devices", "cpu"], env=env)
        assert proc.returncode == 1, proc.stderr
        assert f"error: output folder {blocker / 'out'} cannot be created" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and "compute capability" not in proc.stderr
    # an object store whose file system package is missing (the storage extras) is named with the fix;
    # s3fs is hidden from the subprocess so the check runs whether or not this machine has it
    code = ("import sys; sys.modules['s3fs'] = None; from nlpstream.jobs.cli import main; sys.argv[0] = 'nlpstream'; "
            "main()")
    proc = subprocess.run([sys.executable, "-c", code, "stream", "--topic", "x", "--bootstrap-servers", "127.0.0.1:9",
                           "--devices", "cpu", "--output", "s3://user:se/cret@bucket/prefix"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "error: output s3://***@bucket/prefix: s3:// needs a package" in proc.stderr, proc.stderr
    assert "nlpstream[s3]" in proc.stderr and "cret" not in proc.stderr


@pytest.mark.kafka
def test_demo_runs_end_to_end(tmp_path):
    proc = run(["demo", "--messages", "150", "--output", str(tmp_path / "demo"), "--devices", "cpu"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "labeled (in Parquet)" in proc.stdout
    table = read_output(tmp_path / "demo")
    produced_bad = 1  # one bad record every 97 messages
    assert table.num_rows == 150 - produced_bad
    assert len(list((tmp_path / "demo").glob("_alerts-*.jsonl"))) == 1
    assert set(table.column("topic_label").to_pylist()) <= {"billing", "delivery", "technical", "account", "product", "other"}
    assert "sentiment by topic" in proc.stdout
