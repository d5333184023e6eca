"""The four folders install under one namespace: nothing claims a generic top-level name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_packages_import_as_nlpstream_and_leave_no_top_level_names(tmp_path):
    code = (
        "import sys, nlpstream.jobs.cli, nlpstream.jobs.stream, nlpstream.jobs.backfill, nlpstream.consumers, "
        "nlpstream.inference.engine, nlpstream.inference.gpu_bench, nlpstream.sinks\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jobs', 'consumers', 'inference', 'sinks')))\n"
        "print(nlpstream.inference.engine.__file__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    top_level, engine_file = proc.stdout.splitlines()[-2:]
    assert top_level == "[]"
    assert Path(engine_file).resolve() == ROOT / "inference" / "engine.py"
