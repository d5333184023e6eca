"""``nlpstream backfill`` killed with SIGKILL midway, then rerun: every row exactly once.

The subprocess is the real console entry point with the engine swapped for
the fake one (slowed down so the kill lands midway); the output is read back
with pyarrow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds

from tests.conftest import read_output

ROOT = Path(__file__).resolve().parents[2]
# the CLI with load_engine replaced by the fake engine (each device call sleeps NLPSTREAM_TEST_DELAY seconds)
LAUNCH = """
import os, sys
import nlpstream.inference as inference
from tests.inference.fakes import FakeRunner, fake_engine

def load_engine(**options):
    delay = float(os.environ.get("NLPSTREAM_TEST_DELAY", "0"))
    runner = FakeRunner("torch-float32", "cpu", delay_s=delay)
    return fake_engine(["cpu"], precision="fp32", runners={"cpu": runner}, max_batch_size=16)[0]

inference.load_engine = load_engine
from nlpstream.jobs.cli import main
sys.argv[0] = "nlpstream"
main()
"""


def _backfill(args: list[str], delay: float) -> subprocess.Popen:
    env = dict(os.environ, NLPSTREAM_TEST_DELAY=str(delay), PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", LAUNCH, "backfill", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_midway_then_rerun_yields_every_row_exactly_once(tmp_path):
    src = tmp_path / "events.jsonl"
    n = 3000
    src.write_text("\n".join(json.dumps({"id": f"e{i}", "text": " " if i % 97 == 0 else f"event {i} text"})
                             for i in range(n)) + "\n")
    out = tmp_path / "out"
    args = ["--input", str(src), "--output", str(out), "--devices", "cpu", "--precision", "fp32",
            "--rows-per-file", "150"]
    proc = _backfill(args, delay=0.02)
    markers = out / "_backfill" / "topic=events"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if markers.exists() and len(list(markers.glob("*.done"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    finished = len(list(markers.glob("*.done")))
    assert 3 <= finished < n // 150, finished  # killed midway
    rerun = _backfill(args, delay=0.0)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert f"{finished * 150:,} (finished by an earlier run)" in err
    ids = read_output(out).column("id").to_pylist()
    blank = {f"e{i}" for i in range(0, n, 97)}
    assert len(ids) == len(set(ids)) == n - len(blank)
    assert set(ids) == {f"e{i}" for i in range(n)} - blank
    rejects = ds.dataset(str(out / "_rejects"), format="parquet", partitioning="hive").to_table()
    assert sorted(rejects.column("id").to_pylist()) == sorted(blank)
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary file left
