"""Failure semantics, leaks and GPU choices of the engine, with fake runners (no model, no GPU)."""

from __future__ import annotations

import time

import pytest

from nlpstream.inference import AgreementError, DeviceError, InferenceError, TextError, metrics
from nlpstream.inference.engine import precision_mode
from tests.inference.fakes import FakeTokenizer, expected_label, fake_engine

TEXTS = [f"order {i} is late again" if i % 3 else f"thanks for ticket {i}" for i in range(40)]


def expected(texts: list[str]) -> list[str]:
    tok = FakeTokenizer()
    return [expected_label(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]


def counter(metric, *labels: str) -> float:
    return (metric.labels(*labels) if labels else metric)._value.get()


def in_flight(engine) -> list[int]:
    return [r.in_flight for r in engine._replicas]


def test_one_transient_fault_changes_nothing():
    eng, runners = fake_engine(["cpu"], precision="fp32", max_batch_size=8)
    with eng:
        retries = counter(metrics.BATCH_RETRIES, "retry")
        runners["cpu"].fail_next = 1
        results = eng.classify_each(TEXTS)
        assert [p.label for p in results] == expected(TEXTS)
        assert [r.alive for r in eng._replicas] == [True]
        assert counter(metrics.BATCH_RETRIES, "retry") - retries == 1
        assert in_flight(eng) == [0]


def test_a_text_that_makes_the_model_fail_is_reported_alone():
    eng, runners = fake_engine(["cuda:0", "cuda:1"], max_batch_size=8)
    with eng:
        texts = list(TEXTS)
        texts[13] = "this one is POISON for the model"
        failed = counter(metrics.ITEM_FAILURES)
        results = eng.classify_each(texts)
        assert [i for i, r in enumerate(results) if isinstance(r, TextError)] == [13]
        assert results[13].index == 13 and "raises on this input" in str(results[13])
        assert [r.label for i, r in enumerate(results) if i != 13] == [e for i, e in enumerate(expected(texts)) if i != 13]
        assert counter(metrics.ITEM_FAILURES) - failed == 1
        assert [r.alive for r in eng._replicas] == [True, True], "a bad text must not take devices out"
        with pytest.raises(TextError) as info:
            eng.classify(["fine text", "POISON again"])
        assert info.value.index == 1
        assert in_flight(eng) == [0, 0]


def test_a_gone_device_is_taken_out_probed_with_backoff_and_brought_back(caplog):
    eng, runners = fake_engine(["cuda:0", "cuda:1"], max_batch_size=4)
    with eng:
        runners["cuda:1"].dead = True
        with caplog.at_level("WARNING", logger="nlpstream.inference.scheduler"):
            assert [p.label for p in eng.classify(TEXTS)] == expected(TEXTS)
        assert [r.alive for r in eng._replicas] == [True, False]
        assert counter(metrics.REPLICA_UP, "cuda:1#1") == 0
        downs = [r for r in caplog.records if "is down" in r.getMessage()]
        assert len(downs) == 1 and "cuda:1#1" in downs[0].getMessage()
        runners["cuda:1"].dead = False
        time.sleep(0.1)  # past the first backoff (0.05 s)
        before = runners["cuda:1"].calls
        with caplog.at_level("WARNING", logger="nlpstream.inference.scheduler"):
            eng.classify(TEXTS)
            eng.classify([t + " again" for t in TEXTS])
        assert [r.alive for r in eng._replicas] == [True, True]
        assert counter(metrics.REPLICA_UP, "cuda:1#1") == 1
        assert any("back in service" in r.getMessage() for r in caplog.records)
        assert runners["cuda:1"].calls - before > 1, "the revived replica gets work again"
        assert in_flight(eng) == [0, 0]


def test_no_replica_left_raises_device_error_and_leaves_nothing_in_flight():
    eng, runners = fake_engine(["cuda:0", "cuda:1"], max_batch_size=4)
    with eng:
        for r in ("cuda:0", "cuda:1"):
            runners[r].dead = True
        with pytest.raises(DeviceError, match="no device replica is live"):
            eng.classify_each(TEXTS)
        assert in_flight(eng) == [0, 0]
        with pytest.raises(DeviceError):  # still down, inside the backoff: at once
            eng.classify(["x"])
        for r in ("cuda:0", "cuda:1"):
            runners[r].dead = False
        time.sleep(0.3)
        assert [p.label for p in eng.classify(TEXTS)] == expected(TEXTS), "probes bring them back"


def test_whatever_raises_inside_the_loop_every_batch_is_collected():
    eng, runners = fake_engine(["cuda:0", "cuda:1"], max_batch_size=2)
    runners["cuda:0"].delay_s = runners["cuda:1"].delay_s = 0.02
    with eng:
        sched = eng._scheduler
        calls = {"n": 0}
        original_pad = sched._pad

        def pad_then_fail(ids, batch):
            calls["n"] += 1
            if calls["n"] == 4:
                raise ValueError("padding bug (simulated)")
            return original_pad(ids, batch)

        sched._pad = pad_then_fail
        with pytest.raises(ValueError):
            eng.classify(TEXTS)
        assert in_flight(eng) == [0, 0]
        sched._pad = original_pad
        original_settle = sched._settle
        sched._settle = lambda *a: (_ for _ in ()).throw(KeyError("bookkeeping bug (simulated)"))
        with pytest.raises(KeyError):
            eng.classify([t + "!" for t in TEXTS])
        assert in_flight(eng) == [0, 0]
        sched._settle = original_settle
        assert [p.label for p in eng.classify(TEXTS)] == expected(TEXTS), "the engine still works"


def test_out_of_memory_shrinks_that_device_budget_and_releases_its_cache_on_its_worker():
    eng, runners = fake_engine(["cuda:0", "cuda:1"], max_batch_size=64)
    with eng:
        runners["cuda:0"].oom_above = 300
        texts = [f"ticket {i} " + "word " * (i % 7) for i in range(400)]
        assert [p.label for p in eng.classify(texts)] == expected(texts)
        replica = eng._replicas[0]
        assert replica.token_cap is not None and replica.token_cap <= 600 and eng._replicas[1].token_cap is None
        assert counter(metrics.DEVICE_TOKEN_CAP, "cuda:0#0") == replica.token_cap
        released = runners["cuda:0"].released_on
        assert released and all(name.startswith("nlpstream-cuda:0") for name in released)
        ooms = runners["cuda:0"].ooms
        eng.classify([t + " more" for t in texts])
        assert runners["cuda:0"].ooms - ooms <= 1, "later calls fit the shrunk budget instead of splitting again"
        assert in_flight(eng) == [0, 0]


def test_nan_output_is_a_fault_never_a_label():
    eng, runners = fake_engine(["cuda:0"], max_batch_size=8)
    with eng:
        nonfinite = counter(metrics.DEVICE_FAILURES, "cuda:0#0", "nonfinite")
        runners["cuda:0"].nan_next = 1  # once: retried, labels right
        assert [p.label for p in eng.classify(TEXTS)] == expected(TEXTS)
        results = eng.classify_each(["a NAN overflow", "calm text"])  # always NaN for this text
        assert isinstance(results[0], TextError) and "NaN" in str(results[0])
        assert results[1].label == expected(["calm text"])[0]
        assert counter(metrics.DEVICE_FAILURES, "cuda:0#0", "nonfinite") - nonfinite >= 3
        assert eng._replicas[0].alive


def test_gpu_precision_is_chosen_per_device_from_its_own_capability():
    eng, _ = fake_engine(["cuda:0", "cuda:1"], capabilities={0: (9, 0), 1: (7, 5)})
    with eng:
        assert eng.modes == {"cuda:0#0": "torch-bfloat16", "cuda:1#1": "torch-float16"}
        assert eng.max_batch_size == 1024 and eng.budget.value == 65536
    assert precision_mode("auto", "cuda:0", False, False, (8, 0)) == "torch-bf16"
    assert precision_mode("auto", "cuda:0", False, False, (7, 0)) == "torch-fp16"
    assert precision_mode("auto", "cuda:0", False, False, None) == "torch-fp16"
    assert precision_mode("fp16", "cuda:0", False, False, (9, 0)) == "torch-fp16"
    with pytest.raises(InferenceError, match="emulated"):
        precision_mode("bf16", "cuda:1", False, False, (7, 5))
    with pytest.raises(InferenceError, match="int8"):
        precision_mode("int8", "cuda:0", False, False, (9, 0))


def test_ties_between_idle_replicas_go_round_robin():
    eng, runners = fake_engine(["cuda:0", "cuda:1", "cuda:2"])
    with eng:
        before = {k: runners[k].calls for k in ("cuda:0", "cuda:1", "cuda:2")}
        for i in range(6):
            eng.classify([f"single text {i}"])
        assert {k: runners[k].calls - before[k] for k in before} == {"cuda:0": 2, "cuda:1": 2, "cuda:2": 2}


def test_each_gpu_replica_is_checked_against_fp32_at_start_up():
    eng, runners = fake_engine(["cuda:0", "cuda:1"], agreement_sample=50)
    with eng:
        assert eng.agreement == {"cuda:0#0": 1.0, "cuda:1#1": 1.0}
        assert counter(metrics.FP32_AGREEMENT, "cuda:1#1") == 1.0
        assert runners["cpu"].name == "torch-float32" and runners["cpu"].calls > 0
    from tests.inference.fakes import FakeRunner

    wrong = FakeRunner("torch-float16", "cuda:1")
    wrong.flip = True
    with pytest.raises(AgreementError, match=r"cuda:1#1 .*agrees with fp32 on 0.0% of 50"):
        fake_engine(["cuda:0", "cuda:1"], agreement_sample=50, runners={"cuda:1": wrong})
    eng, _ = fake_engine(["cuda:1"], agreement_sample=50, runners={"cuda:1": wrong}, min_agreement=0)
    with eng:  # the check can be turned off
        assert eng.agreement == {} and eng.classify(["x y"])[0].label != expected(["x y"])[0]


def test_two_unlucky_transient_faults_never_cost_a_single_text_its_label():
    eng, runners = fake_engine(["cuda:0", "cuda:1"])
    with eng:
        runners["cuda:0"].fail_next = runners["cuda:1"].fail_next = 1
        results = eng.classify_each(["a perfectly good text"])
        assert results[0].label == expected(["a perfectly good text"])[0]
        runners["cuda:0"].fail_next = 2
        runners["cuda:1"].fail_next = 0
        eng2, r2 = fake_engine(["cpu"], precision="fp32")
        with eng2:
            r2["cpu"].fail_next = 2
            assert eng2.classify_each(["another good text"])[0].label == expected(["another good text"])[0]


def test_a_single_text_out_of_memory_is_retried_not_blamed():
    eng, runners = fake_engine(["cuda:0", "cuda:1"])
    with eng:
        runners["cuda:0"].oom_above = 1  # this device cannot hold even one text
        results = eng.classify_each(["short text here"])
        assert results[0].label == expected(["short text here"])[0]
        assert eng._replicas[0].token_cap is None, "a one-text batch says nothing about a batch budget"
        runners["cuda:1"].oom_above = 1  # now neither can: after three tries it is reported as not fitting
        results = eng.classify_each(["short text there"])
        assert isinstance(results[0], TextError) and "does not fit" in str(results[0])
        assert in_flight(eng) == [0, 0]


def test_a_hung_device_call_takes_its_replica_out_and_the_batch_reruns_elsewhere():
    eng, runners = fake_engine(["cuda:0", "cuda:1"], attempt_timeout_s=0.3, max_batch_size=8)
    with eng:
        runners["cuda:0"].hang_next = 1
        assert [p.label for p in eng.classify(TEXTS)] == expected(TEXTS)
        assert [r.alive for r in eng._replicas] == [False, True]
        assert counter(metrics.DEVICE_FAILURES, "cuda:0#0", "timeout") >= 1
        assert in_flight(eng)[0] >= 1 and in_flight(eng)[1] == 0, "the hung calls still count until they return"
        runners["cuda:0"].unhang.set()
        time.sleep(0.2)
        eng.classify(["one more text"])
        assert in_flight(eng) == [0, 0], "collected once it returned"
    eng, runners = fake_engine(["cuda:0"], attempt_timeout_s=0.3)
    runners["cuda:0"].hang_next = 1
    with pytest.raises(DeviceError, match="no device replica is live"):
        eng.classify(["nobody answers"])
    runners["cuda:0"].unhang.set()
    eng.close()


def test_failures_map_back_through_duplicates_and_chunk_windows():
    eng, _ = fake_engine(["cpu"], precision="fp32", max_batch_size=4)
    with eng:
        texts = ["good one", "POISON here", "good two", "POISON here", "good one"]
        results = eng.classify_each(texts)
        assert [isinstance(r, TextError) for r in results] == [False, True, False, True, False]
        assert [r.index for r in results if isinstance(r, TextError)] == [1, 3]
    eng, _ = fake_engine(["cpu"], precision="fp32", long_text="chunk", chunk_overlap=2)
    with eng:
        long_good = " ".join(f"w{i}" for i in range(150))
        long_bad = long_good + " POISON " + long_good
        results = eng.classify_each([long_good, long_bad, "short"])
        assert len(eng._windows(long_bad)) > 2
        assert [isinstance(r, TextError) for r in results] == [False, True, False]


def test_cpu_engines_plan_with_the_cpu_pad_tolerance_and_gpu_engines_with_the_default():
    """The tolerance reaches the scheduler's plan: 0.3 on CPU joins texts that 0.1 would have cut apart."""
    from nlpstream.inference.batching import PAD_TOLERANCE
    from nlpstream.inference.engine import CPU_PAD_TOLERANCE

    # token lengths 20 down to 15 with the fake tokenizer: each over 10% shorter than the longest after 1 or 2
    texts = [" ".join(["word"] * n) for n in (18, 16, 15, 14, 13)]
    counts = {}
    for devices in (["cpu"], ["cuda:0"]):
        eng, runners = fake_engine(devices, precision="fp32", max_batch_size=32, max_batch_tokens=64)
        with eng:
            assert eng.pad_tolerance == eng._scheduler.pad_tolerance
            before = runners[devices[0]].calls
            assert [p.label for p in eng.classify_each(texts)] == expected(texts)
            counts[devices[0]] = runners[devices[0]].calls - before
    assert (CPU_PAD_TOLERANCE, PAD_TOLERANCE) == (0.3, 0.1)
    assert counts["cpu"] < counts["cuda:0"], counts
