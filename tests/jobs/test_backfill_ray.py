"""``--executor ray`` on a local Ray instance (num_cpus=2) with the builtin model: the same rows, labels,
rejects and file names as the local executor, a rerun resumes, and an unreachable address is one error."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow.dataset as ds
import pytest

from nlpstream.jobs.backfill import BackfillError, run_backfill
from nlpstream.jobs.config import BackfillConfig, load_config
from tests.conftest import read_output

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def _cfg(out: str) -> BackfillConfig:
    return load_config(BackfillConfig, None, {"output.output": out, "rows_per_file": 40, "model.devices": "cpu",
                                              "model.precision": "fp32", "model.cache_entries": 0})


def _inputs(tmp_path) -> list[str]:
    texts = ["I love this, thank you!", "The order never arrived.", "What are your opening hours?",
             "Terrible support, I want a refund.", "Great product, works perfectly."]
    (tmp_path / "a.jsonl").write_text("\n".join(
        json.dumps({"id": f"a{i}", "text": "" if i == 17 else f"{texts[i % 5]} ({i})"}) for i in range(130)) + "\n")
    (tmp_path / "b.csv").write_text("id,text\n" + "\n".join(f"b{i},\"{texts[i % 5]} [{i}]\"" for i in range(50)) + "\n")
    return [str(tmp_path / "a.jsonl"), str(tmp_path / "b.csv")]


def _files(out) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet") if "_rejects" not in p.parts)


def test_an_unreachable_ray_address_is_a_clear_error(tmp_path):
    import socket

    import ray

    from nlpstream.jobs.backfill_ray import run_backfill_ray

    assert not ray.is_initialized()  # runs before the module's Ray instance starts
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    with pytest.raises(BackfillError, match=f"cannot reach the Ray cluster at 127.0.0.1:{dead}"):
        run_backfill_ray(_cfg(str(tmp_path / "out")), _inputs(tmp_path), address=f"127.0.0.1:{dead}")


def test_ray_executor_matches_the_local_one_and_resumes(local_ray, engine, tmp_path):
    from nlpstream.jobs.backfill_ray import run_backfill_ray

    inputs = _inputs(tmp_path)
    summary = run_backfill_ray(_cfg(str(tmp_path / "ray")), inputs)
    local = run_backfill(_cfg(str(tmp_path / "local")), inputs, engine)
    assert summary.executor == "ray" and summary.rows == local.rows == 179 and summary.skipped == 1
    assert summary.labels == local.labels
    ray_rows = {r["id"]: (r["label"], r["offset"], r["topic"]) for r in read_output(tmp_path / "ray").to_pylist()}
    local_rows = {r["id"]: (r["label"], r["offset"], r["topic"]) for r in read_output(tmp_path / "local").to_pylist()}
    assert ray_rows == local_rows and len(ray_rows) == 179
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")  # the same deterministic names
    rejects = ds.dataset(str(tmp_path / "ray" / "_rejects"), partitioning="hive").to_table().to_pylist()
    assert [(r["id"], r["offset"], r["reason"]) for r in rejects] == [("a17", 17, "blank_text")]
    again = run_backfill_ray(_cfg(str(tmp_path / "ray")), inputs)
    assert again.rows == 0 and again.already_done == 180
    assert read_output(tmp_path / "ray").num_rows == 179
