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


def test_consumers_inference_and_sinks_never_import_each_other():
    """DESIGN: dependencies point one way, jobs -> {consumers, inference, sinks}; those three exchange plain
    data and are wired together by jobs (a function one needs from another is passed in)."""
    import ast

    packages = ("consumers", "inference", "sinks")
    crossing = []
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    module = node.module or ""
                    if node.level:  # relative: from the file's package up (level - 1) steps
                        here = ["nlpstream", *path.relative_to(ROOT).with_suffix("").parts[:-1]]
                        module = ".".join(here[:len(here) - node.level + 1] + ([module] if module else []))
                    # from nlpstream import sinks names the package in the imported names
                    names = [f"{module}.{a.name}" for a in node.names] if module == "nlpstream" else [module]
                else:
                    continue
                for name in names:
                    parts = name.split(".")
                    target = parts[1] if parts[0] == "nlpstream" and len(parts) > 1 else None
                    if target in packages and target != package:
                        crossing.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert crossing == []
