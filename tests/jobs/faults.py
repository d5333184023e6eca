"""Helpers for the fault-injection tests: run the real CLI, check exactness."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.conftest import read_output


def stream_proc(bootstrap: str, topic: str, out: Path, group: str, *extra: str, log: Path | None = None,
                env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "jobs.cli", "stream", "--bootstrap-servers", bootstrap, "--topic", topic,
           "--group-id", group, "--output", str(out), "--devices", "cpu", "--flush-interval", "0.3",
           "--metrics-port", "0", *extra]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", NLPSTREAM_KAFKA__SESSION_TIMEOUT_MS="6000",
                    NLPSTREAM_STALL_TIMEOUT="60",
                    NLPSTREAM_KAFKA__FETCH_STALL_TIMEOUT="20", **(env or {}))
    sink = open(log, "a") if log else subprocess.DEVNULL  # noqa: SIM115 - closed by the child's exit
    proc = subprocess.Popen(cmd, env=full_env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    STARTED.append(proc)
    return proc


STARTED: list[subprocess.Popen[str]] = []  # reaped after each test, whatever its outcome


def reap() -> None:
    """Kill every job a test started and left running (a failed assertion mid-test)."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def files(out: Path) -> list[Path]:
    return list(out.glob("topic=*/date=*/part-*.parquet"))


def rows_in(out: Path) -> int:
    return read_output(out).num_rows if files(out) else 0


def wait_for(predicate: Any, timeout_s: float, what: str, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def exactness(out: Path, partitions: int, n: int) -> dict[str, int]:
    """Lost and duplicated counts of offsets 0..end per partition against ``n`` produced in all."""
    table = read_output(out) if files(out) else None
    pairs = list(zip(table.column("partition").to_pylist(), table.column("offset").to_pylist())) if table else []
    counts = Counter(pairs)
    duplicated = sum(c - 1 for c in counts.values() if c > 1)
    per_partition = Counter(p for p, _ in counts)
    lost = n - len(counts)
    gaps = 0
    for p in range(partitions):
        offsets = sorted(o for q, o in counts if q == p)
        gaps += (offsets[-1] + 1 - len(offsets)) if offsets else 0
    return {"rows": len(pairs), "lost": lost, "duplicated": duplicated, "gaps": gaps,
            "partitions_seen": len(per_partition)}
