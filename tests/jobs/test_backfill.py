"""Backfill with an engine whose model fails on one text: that text is reported, the rest labeled; the
collector settings the engine is called under."""

from __future__ import annotations

import gc
import json

from nlpstream.inference.types import Prediction
from nlpstream.jobs.backfill import run_backfill
from nlpstream.jobs.config import BackfillConfig, load_config
from nlpstream.jobs.gc_tuning import YOUNG_THRESHOLD
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


def test_the_engine_is_called_under_the_tuned_collector_unless_turned_off(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"id": f"r{i}", "text": f"text {i}"}) for i in range(5)) + "\n")
    before = gc.get_threshold()
    for tuned in (True, False):
        seen = []

        class Engine:  # the stand-in protocol: classify, model_name, close
            model_name = "stand-in"

            def classify(self, texts):
                seen.append((gc.get_threshold()[0], gc.get_freeze_count() > 0))
                return [Prediction("positive", 0.9, {"positive": 0.9}) for _ in texts]

            def close(self):
                pass

        cfg = load_config(BackfillConfig, None, {"output.output": str(tmp_path / f"out-{tuned}"), "gc_tuning": tuned})
        assert run_backfill(cfg, [src], Engine()).rows == 5
        assert seen and all(s == ((YOUNG_THRESHOLD, True) if tuned else (before[0], False)) for s in seen)
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0  # restored after the run
