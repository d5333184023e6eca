"""Dedup cache, long-text chunking, request batching and adaptive budgets on the real model."""

import threading

import pytest

from nlpstream.inference import load_engine, metrics
from nlpstream.inference.engine import Engine, precision_mode
from nlpstream.inference.errors import InferenceError

pytestmark = pytest.mark.model


def test_cache_serves_repeats_without_inference(engine):
    with Engine(engine.bundle, ["cpu"], "fp32", cache_entries=1000) as eng:
        calls = []
        original = eng._forward
        eng._forward = lambda r, i, m: calls.append(len(i)) or original(r, i, m)
        first = eng.classify(["Where is my parcel?", "Great job, thanks!"])
        hits = metrics.CACHE_REQUESTS.labels("hit")._value.get()
        again = eng.classify(["Great job, thanks!", "Where is my parcel?", "Where is my parcel?"])
        assert [p.label for p in again] == [first[1].label, first[0].label, first[0].label]
        assert sum(calls) == 2, "repeats must not reach a device"
        assert metrics.CACHE_REQUESTS.labels("hit")._value.get() - hits == 2


def test_chunking_covers_the_whole_document(engine):
    with Engine(engine.bundle, ["cpu"], "fp32", long_text="chunk", cache_entries=0) as eng:
        short = "Thanks, the refund arrived quickly."
        assert abs(eng.classify([short])[0].score - engine.classify([short])[0].score) < 1e-5
        good = "The support team was wonderful and fixed everything, thank you so much. " * 40
        bad = "The product broke again, support ignored me, worst purchase ever. " * 400
        doc = good + bad
        assert engine.classify([doc])[0].label == "positive"  # truncation sees only the start
        assert eng.classify([doc])[0].label == "negative"  # windows see all of it
        assert len(eng._windows(doc)) > 10
        megabyte = "The delivery was late and the box was damaged. " * 22000
        assert len(megabyte) > 1_000_000
        windows = eng._windows(megabyte)
        assert all(len(w) <= eng.max_length for w in windows) and len(windows) > 1000
    with Engine(engine.bundle, ["cpu"], "auto", long_text="chunk", cache_entries=0) as fast:  # ~1100 windows
        pred = fast.classify([megabyte, short])[0]
        assert pred.label in fast.labels and abs(sum(pred.probs.values()) - 1) < 1e-4


def test_megabyte_text_under_truncate_policy(engine):
    pred = engine.classify(["x " * 600_000])[0]
    assert abs(sum(pred.probs.values()) - 1) < 1e-4


def test_submit_batches_concurrent_callers(engine):
    with Engine(engine.bundle, ["cpu"], "fp32", cache_entries=0, max_batch_delay_ms=50) as eng:
        calls = []
        original = eng._classify_texts
        eng._classify_texts = lambda texts: calls.append(len(texts)) or original(texts)
        texts = [f"Order {i} never arrived." if i % 2 else f"Thanks for order {i}!" for i in range(8)]
        futures = [None] * 8
        threads = [threading.Thread(target=lambda i=i: futures.__setitem__(i, eng.submit([texts[i]]))) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = [f.result(timeout=60)[0] for f in futures]
        assert [r.label for r in results] == [p.label for p in engine.classify(texts)]
        assert len(calls) < 8, "concurrent submits should share batches"


def test_adaptive_budget_follows_target(engine):
    with Engine(engine.bundle, ["cpu"], "fp32", cache_entries=0, max_batch_tokens=8192,
                target_latency_ms=20) as eng:
        eng.classify([f"The service was slow again, ticket {i}." for i in range(400)])
        assert eng.budget.value < 8192
        assert eng.budget.seconds_per_token is not None


def test_precision_modes():
    assert precision_mode("auto", "cpu", True, True) == "openvino-int8"
    assert precision_mode("auto", "cpu", False, False) == "torch-fp32"
    assert precision_mode("bf16", "cpu", True, False) == "openvino-bf16"
    assert precision_mode("bf16", "cpu", False, False) == "torch-bf16"
    assert precision_mode("fp32", "cpu", True, True) == "torch-fp32"
    with pytest.raises(InferenceError, match="fp16"):
        precision_mode("fp16", "cpu", True, True)
    with pytest.raises(InferenceError, match="nncf"):
        precision_mode("int8", "cpu", True, False)
    with pytest.raises(InferenceError, match="unknown precision"):
        precision_mode("fp8", "cpu", True, True)


def test_load_engine_options_pass_through():
    with load_engine(devices="cpu", precision="fp32", long_text="chunk", cache_entries=0, target_latency_ms=50) as eng:
        assert eng.long_text == "chunk" and not eng.cache.enabled and eng.budget.target_s == 0.05
