"""Backfill with an engine whose model fails on one text: that text is reported, the rest labeled."""

from __future__ import annotations

import json

from nlpstream.jobs.backfill import run_backfill
from nlpstream.jobs.config import BackfillConfig, load_config
from tests.conftest import read_output
from tests.inference.fakes import fake_engine


def test_a_text_the_model_fails_on_is_reported_and_the_rest_labeled(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"id": f"r{i}", "text": "POISON text" if i == 3 else f"fine text {i}"})
                             for i in range(10)) + "\n")
    cfg = load_config(BackfillConfig, None, {"output.output": str(tmp_path / "out")})
    engine, _ = fake_engine(["cpu"], precision="fp32")
    with engine:
        summary = run_backfill(cfg, [src], engine)
    assert summary.rows == 9 and len(summary.failed) == 1 and summary.failed[0].startswith("in.jsonl:3: ")
    ids = set(read_output(tmp_path / "out").column("id").to_pylist())
    assert ids == {f"r{i}" for i in range(10) if i != 3}
