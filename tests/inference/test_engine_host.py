"""The engine's host side: results kept as arrays, predictions built from them, and large calls tokenized in
parts on a helper thread with the answers of one plan over the whole call (fake tokenizer and runners, no model)."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import random
import threading
import time

import numpy as np
import pytest
import torch

from nlpstream.inference import DeviceError, TextError
from nlpstream.inference.engine import Engine
from nlpstream.inference.model import ModelBundle
from nlpstream.inference.types import Prediction, predictions_of
from tests.inference.fakes import LABELS, FakeRunner, FakeTokenizer, fake_engine


class RefusingTokenizer(FakeTokenizer):
    """Raises on any text holding REFUSE (on the whole list, so the engine goes text by text); records threads."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.threads: list[str] = []
        self.spans: list[tuple[float, float]] = []
        self.delay_s = delay_s

    def __call__(self, texts, **kw):
        start = time.monotonic()
        self.threads.append(threading.current_thread().name)
        batch = [texts] if isinstance(texts, str) else list(texts)
        if any("REFUSE" in t for t in batch) and kw.get("add_special_tokens", True):
            raise ValueError("cannot tokenize this (simulated)")
        time.sleep(self.delay_s)
        try:
            return super().__call__(texts, **kw)
        finally:
            self.spans.append((start, time.monotonic()))


class TwoHeadRunner(FakeRunner):
    """The fake runner's three labels, then a second head of two labels (parity of the real ids)."""

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        first = super().__call__(input_ids, mask)
        odd = ((input_ids * mask).sum(dim=1) % 2).float()
        second = torch.stack([0.3 + 0.4 * odd, 0.7 - 0.4 * odd], dim=1)
        return torch.cat([first, second], dim=1)


def corpus(n: int = 90, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    words = ["order", "late", "thanks", "refund", "box", "broken", "great", "never", "again", "ticket"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(n)]
    texts[5] = texts[17] = texts[40]  # duplicates
    texts[8] = "fine but POISON inside"  # fails alone on healthy devices
    texts[23] = texts[61] = "REFUSE this one"  # the tokenizer refuses it
    texts[30] = "NAN here"  # the runner returns NaN for it
    texts[33] = " ".join(["long"] * 200)  # truncated to max_length
    return texts


def engine_with(tokenizer, runner, heads=(), **options) -> Engine:
    labels = LABELS
    bundle = ModelBundle(name="fake", module=None, tokenizer=tokenizer, labels=labels,  # type: ignore[arg-type]
                         max_length=64, heads=heads)
    options.setdefault("cache_entries", 0)
    return Engine(bundle, ["cpu"], "fp32", runner_factory=lambda mode, device: runner, probe_backoff_s=0.05,
                  min_agreement=0, **options)


def same(a, b) -> bool:
    if isinstance(a, TextError) or isinstance(b, TextError):
        return type(a) is type(b) and (a.index, str(a)) == (b.index, str(b))
    return a == b


@pytest.mark.parametrize("heads", [(), (("", LABELS), ("parity", ("even", "odd")))])
def test_parts_give_the_answers_of_one_plan(heads):
    runner_class = TwoHeadRunner if heads else FakeRunner
    texts = corpus()
    with engine_with(RefusingTokenizer(), runner_class(), heads, max_batch_size=4) as whole:
        expected, expected_tokens = whole.classify_counted(texts)
    tok = RefusingTokenizer()
    with engine_with(tok, runner_class(), heads, max_batch_size=4) as parts:
        parts._part_texts = 8  # 90 texts (86 distinct) in 11 parts
        got, tokens = parts.classify_counted(texts)
    assert any(t.startswith("nlpstream-tokenize") for t in tok.threads), "parts are tokenized on the helper thread"
    assert tokens == expected_tokens and len(got) == len(texts)
    assert all(same(a, b) for a, b in zip(got, expected))
    errors = {i: str(r) for i, r in enumerate(got) if isinstance(r, TextError)}
    assert sorted(errors) == [8, 23, 30, 61] and "tokenizer" in errors[23] and "tokenizer" in errors[61]
    assert got[5] == got[17] == got[40] and isinstance(got[5], Prediction)
    if heads:
        assert all(set(p.heads) == {"parity"} for p in got if isinstance(p, Prediction))


def test_parts_with_the_cache_serve_repeats():
    texts = [t for t in corpus(seed=4) if not any(w in t for w in ("POISON", "REFUSE", "NAN"))]  # all cached
    runner = FakeRunner()
    with engine_with(RefusingTokenizer(), runner, cache_entries=1000, max_batch_size=4) as eng:
        eng._part_texts = 5
        first, tokens = eng.classify_counted(texts)
        calls = runner.calls
        again, again_tokens = eng.classify_counted(texts)
        assert runner.calls == calls and again_tokens == 0, "every text served from the cache"
        assert again == first and tokens > 0


class FakeEncoding:
    """What the Rust tokenizer's encode_batch gives per text: ``len`` and ``.ids`` (records the reading thread)."""

    def __init__(self, ids: list[int], reads: list[str]) -> None:
        self._ids, self._reads = ids, reads

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[int]:
        self._reads.append(threading.current_thread().name)
        return self._ids


class FakeBackend:
    """A Rust-style backend over the refusing tokenizer: encode_batch raises on a list holding REFUSE."""

    def __init__(self, max_length: int = 64) -> None:
        self.tokenizer, self.max_length = RefusingTokenizer(), max_length
        self.threads: list[str] = []
        self.reads: list[str] = []

    def encode_batch(self, texts, add_special_tokens=True):
        self.threads.append(threading.current_thread().name)
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, add_special_tokens=True,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        return [FakeEncoding(list(x), self.reads) for x in ids]


def test_parts_through_a_rust_style_backend_give_the_answers_of_one_plan():
    """Parts are encoded on the helper thread and their ids read on the caller's; a part the backend
    refuses goes text by text, with the answers of one plan over the whole call."""
    texts = corpus()
    with engine_with(RefusingTokenizer(), FakeRunner(), max_batch_size=4) as whole:
        expected, expected_tokens = whole.classify_counted(texts)
    backend = FakeBackend()
    with engine_with(RefusingTokenizer(), FakeRunner(), max_batch_size=4) as parts:
        parts.__dict__["_backend"] = backend  # the cached property, as a real fast tokenizer would give it
        parts._part_texts = 8
        got, tokens = parts.classify_counted(texts)
        assert tokens == expected_tokens and all(same(a, b) for a, b in zip(got, expected))
        assert sorted(i for i, r in enumerate(got) if isinstance(r, TextError)) == [8, 23, 30, 61]
        assert backend.threads and all(t.startswith("nlpstream-tokenize") for t in backend.threads)
        backend.reads.clear()
        clean = [t for t in texts if "REFUSE" not in t]
        parts.classify_counted(clean)
        caller = threading.current_thread().name
        assert len(backend.reads) == len(set(clean)) and set(backend.reads) == {caller}, \
            "every part's ids are read on the caller's thread, once per distinct text"


def test_a_device_error_mid_call_leaves_no_tokenizing_behind():
    tok = RefusingTokenizer(delay_s=0.02)
    runner = FakeRunner()
    with engine_with(tok, runner, max_batch_size=4) as eng:
        eng._part_texts = 6
        runner.dead = True
        with pytest.raises(DeviceError):
            eng.classify([f"text number {i}" for i in range(40)])
        returned = time.monotonic()
        assert all(end <= returned for _, end in tok.spans), "no part is still being tokenized"
    assert not any(t.name.startswith("nlpstream-tokenize") and t.is_alive() for t in threading.enumerate())


def test_array_predictions_equal_row_by_row_predictions():
    eng, _ = fake_engine(["cpu"], precision="fp32")
    with eng:
        rng = np.random.default_rng(0)
        probs = rng.random((200, 3))
        probs[:20] = [0.4, 0.4, 0.2]  # ties go to the first label, as max() and list.index do
        probs[20:25] = [0.2, 0.4, 0.4]
        probs[25] = [math.inf, 0.1, 0.2]  # a non-finite row goes through the row-by-row path
        probs[26] = np.nan  # a failed row
        got = eng._predictions(probs, {26: "failed"})
        rows = probs.tolist()
        for i, p in enumerate(got):
            if i == 26:
                assert isinstance(p, TextError) and p.index == 26
            else:
                assert p == eng._prediction(rows[i])
        clean = probs[:20].tolist() + probs[27:].tolist()  # every row finite, none failed: the one-head fast path
        assert eng._predictions(np.array(clean), {}) == [eng._prediction(r) for r in clean]
        margins = eng._margins(probs)
        assert [m for i, m in enumerate(margins.tolist()) if i != 26] == [
            eng._margin(r) for i, r in enumerate(rows) if i != 26]
        assert math.isnan(margins[26])


def test_predictions_of_makes_what_the_constructor_makes():
    labels = ("negative", "neutral", "positive")
    rows = [[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]
    best, scores = [2, 0, 0], [0.7, 0.5, 0.5]
    got = predictions_of(labels, best, scores, rows)
    made = [Prediction(labels[b], s, dict(zip(labels, r))) for b, s, r in zip(best, scores, rows)]
    assert got == made and [repr(p) for p in got] == [repr(p) for p in made]
    assert all(type(p) is Prediction for p in got)
    assert not hasattr(Prediction, "__post_init__")  # a check there would be skipped by predictions_of
    with pytest.raises(dataclasses.FrozenInstanceError):
        got[0].label = "x"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(got)) == made and copy.deepcopy(got) == made
    assert dataclasses.replace(got[0], score=0.1) == dataclasses.replace(made[0], score=0.1)
    got[1].heads["h"] = got[0]  # equal rows still get dicts of their own, as with the constructor
    got[1].probs["extra"] = 1.0
    assert got[2].heads == {} and got[2].probs == made[2].probs
    assert predictions_of(labels, [], [], []) == []
