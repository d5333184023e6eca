"""The real builtin model on CPU: agreement, order, long texts, replicas, failures."""

import json
import shutil

import pytest
import torch

from nlpstream.inference import DeviceError, InferenceError, ModelLoadError, UnsafeModelError, load_engine
from nlpstream.inference.builtin import BUILTIN_DIR, load_builtin
from nlpstream.inference.engine import Engine
from nlpstream.inference.model import load_model

pytestmark = pytest.mark.model

TEXTS = [
    "I love this product, it works perfectly!",
    "The package never arrived and support ignores my emails.",
    "What are your opening hours on Sunday?",
    "Shares plunged 20% after the company cut its guidance.",
    "The company raised its dividend and beat estimates.",
    "The board will meet on Tuesday.",
    "ok",
    "😀🎉 مرحبا \x00 nul",
    " ".join(["The refund was processed but the app still shows an error."] * 30),
]


def test_labels_are_sensible(engine):
    preds = engine.classify(TEXTS[:6])
    assert [p.label for p in preds] == ["positive", "negative", "neutral", "negative", "positive", "neutral"]
    for p in preds:
        assert set(p.probs) == {"negative", "neutral", "positive"}
        assert abs(sum(p.probs.values()) - 1.0) < 1e-4
        assert p.score == max(p.probs.values())


def test_batched_equals_one_at_a_time(engine):
    batched = engine.classify(TEXTS)
    for text, b in zip(TEXTS, batched):
        single = engine.classify([text])[0]
        assert single.label == b.label
        for k in b.probs:
            assert abs(single.probs[k] - b.probs[k]) < 1e-4


def test_order_duplicates_and_empty(engine):
    assert engine.classify([]) == []
    texts = TEXTS * 3
    preds = engine.classify(texts)
    assert len(preds) == len(texts)
    expected = {t: p.label for t, p in zip(TEXTS, engine.classify(TEXTS))}
    assert [p.label for p in preds] == [expected[t] for t in texts]


def test_megabyte_text(engine):
    big = "The service was slow and the staff ignored us. " * 22000
    assert len(big) > 1_000_000
    pred = engine.classify([big, "fine"])[0]
    head = engine.classify([big[:3000]])[0]  # truncation keeps the first max_length tokens
    assert pred.label == head.label
    assert abs(pred.score - head.score) < 1e-4


def test_two_cpu_replicas_share_the_work():
    with load_engine(devices="cpu:2", precision="fp32", max_batch_size=4, cache_entries=0) as eng:
        assert eng.devices == ("cpu#0", "cpu#1")
        calls = {"cpu#0": 0, "cpu#1": 0}
        original = eng._forward

        def counting(replica, ids, mask):
            calls[replica.name] += 1
            return original(replica, ids, mask)

        eng._forward = counting
        preds = eng.classify([f"{t} {i}" for i, t in enumerate(TEXTS * 4)])
        assert len(preds) == len(TEXTS) * 4
        assert calls["cpu#0"] > 0 and calls["cpu#1"] > 0


def test_failing_replica_is_taken_out_and_batch_reruns():
    with load_engine(devices="cpu:2", precision="fp32", max_batch_size=2, cache_entries=0) as eng:
        reference = [p.label for p in eng.classify(TEXTS)]
        original = eng._forward

        def flaky(replica, ids, mask):
            if replica.name == "cpu#1":
                raise RuntimeError("device fell off the bus")
            return original(replica, ids, mask)

        eng._forward = flaky
        assert [p.label for p in eng.classify(TEXTS)] == reference
        assert [r.alive for r in eng._replicas] == [True, False]


def test_all_replicas_failing_raises_device_error():
    with load_engine(devices="cpu", precision="fp32", cache_entries=0) as eng:
        def broken(replica, ids, mask):
            raise RuntimeError("boom")

        eng._forward = broken
        with pytest.raises(DeviceError, match="no device replica is live"):
            eng.classify(["hello"])
        assert [r.in_flight for r in eng._replicas] == [0]


def test_out_of_memory_splits_the_batch(engine):
    bundle = engine.bundle
    with Engine(bundle, ["cpu"], "fp32", max_batch_size=8, cache_entries=0) as eng:
        reference = [p.label for p in eng.classify(TEXTS)]
        original = eng._forward

        def small_memory(replica, ids, mask):
            if ids.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return original(replica, ids, mask)

        eng._forward = small_memory
        assert [p.label for p in eng.classify(TEXTS)] == reference


def test_closed_engine_refuses():
    eng = load_engine(devices="cpu", precision="fp32")
    eng.close()
    with pytest.raises(InferenceError):
        eng.classify(["x"])


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_fast_precisions_batched_equal_single_and_agree_with_fp32(engine, precision):
    from nlpstream.inference.bench import make_corpus

    with Engine(engine.bundle, ["cpu"], precision, cache_entries=0) as fast:
        assert fast.modes["cpu#0"].startswith("openvino")
        batched = fast.classify(TEXTS)
        for text, b in zip(TEXTS, batched):
            single = fast.classify([text])[0]
            assert single.label == b.label
            for k in b.probs:
                assert abs(single.probs[k] - b.probs[k]) < 0.02
        corpus = make_corpus(400, seed=11)
        ref = [p.label for p in engine.classify(corpus)]
        got = [p.label for p in fast.classify(corpus)]
    assert sum(a == b for a, b in zip(ref, got)) / len(ref) >= 0.99


def test_auto_precision_on_cpu_is_guarded_int8(fast_engine, engine):
    assert fast_engine.modes == {"cpu#0": "openvino-int8+bf16-guard"}
    assert [p.label for p in fast_engine.classify(TEXTS[:6])] == [p.label for p in engine.classify(TEXTS[:6])]


def test_corrupted_or_missing_head_is_refused(tmp_path):
    for name in ("sentiment.json", "sentiment.safetensors"):
        shutil.copy(BUILTIN_DIR / name, tmp_path / name)
    assert load_builtin("sentiment", tmp_path).labels == ("negative", "neutral", "positive")
    blob = bytearray((tmp_path / "sentiment.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (tmp_path / "sentiment.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ModelLoadError, match="corrupted"):
        load_builtin("sentiment", tmp_path)
    (tmp_path / "sentiment.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_builtin("sentiment", tmp_path)
    with pytest.raises(ModelLoadError, match="unknown builtin"):
        load_model("builtin:nope")


def test_hf_directory_loads_and_unsafe_ones_are_refused(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from nlpstream.inference.builtin import backbone_dir

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, num_labels=2, id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1})
    model = BertForSequenceClassification(config)
    tok = BertTokenizerFast.from_pretrained(str(backbone_dir()))
    good = tmp_path / "good"
    model.save_pretrained(good, safe_serialization=True)
    tok.save_pretrained(good)
    with load_engine(str(good), devices="cpu") as eng:
        preds = eng.classify(["hello", "world"])
    assert {p.label for p in preds} <= {"bad", "good"}

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in good.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, pickled / f.name)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(UnsafeModelError, match="safetensors only"):
        load_engine(str(pickled), devices="cpu")

    remote = tmp_path / "remote"
    shutil.copytree(good, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.Evil"}
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsafeModelError, match="trust_remote_code"):
        load_engine(str(remote), devices="cpu")

    with pytest.raises(ModelLoadError):
        load_engine(str(tmp_path / "does-not-exist-anywhere"), devices="cpu")


def test_direct_tokenizer_backend_gives_the_transformers_ids(engine):
    from nlpstream.inference.bench import make_corpus

    assert engine._backend is not None
    texts = make_corpus(300, seed=5) + ["", " ", "😀🎉 مرحبا \x00 nul", "word " * 2000, "Ünïcödé façade naïve"]
    expected = [list(x) for x in engine.bundle.tokenizer(
        texts, truncation=True, max_length=engine.max_length, add_special_tokens=True,
        return_attention_mask=False, return_token_type_ids=False)["input_ids"]]
    assert engine.tokenize(texts) == expected
    assert engine._encode(texts).tolist() == expected, "the flat ids of a call read back as the same lists"
    assert max(len(x) for x in expected) == engine.max_length


def test_a_large_call_in_parts_equals_one_plan(engine):
    from nlpstream.inference.bench import make_corpus

    texts = make_corpus(200, seed=9) + TEXTS + TEXTS[:3]
    with Engine(engine.bundle, ["cpu"], "fp32", cache_entries=0, min_agreement=0) as parts:
        parts._part_texts = 32  # 212 texts in 7 parts, tokenized on the helper thread
        got, tokens = parts.classify_counted(texts)
    want, want_tokens = engine.classify_counted(texts)
    assert tokens == want_tokens
    assert [p.label for p in got] == [p.label for p in want]
    for a, b in zip(got, want):  # other batch shapes: the same probabilities up to float rounding
        assert a.probs == pytest.approx(b.probs, abs=1e-5)


def test_the_fast_batch_encode_gives_the_ids_of_the_full_encode(engine):
    """The engine encodes with ``encode_batch_fast`` (no character offsets): on the builtin tokenizer it must
    give the ids ``encode_batch`` gives, truncation and special tokens included."""
    from nlpstream.inference.engine import batch_encoder

    backend = engine._backend
    assert backend is not None and batch_encoder(backend) == backend.encode_batch_fast
    texts = ["Great service!", "  ", "naïve café 😀 مرحبا", "refund " * 400, "x" * 5000, "Second line\nthird"]
    fast = [e.ids for e in engine._encodings(backend, texts)]
    full = [e.ids for e in backend.encode_batch(engine._clip(texts), add_special_tokens=True)]
    assert fast == full and max(map(len, fast)) == engine.max_length
