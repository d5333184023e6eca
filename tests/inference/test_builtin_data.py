"""The shipped training data: size, balance, no leakage between splits."""

import json
from collections import Counter

import pytest

from nlpstream.inference.builtin import BUILTIN_DIR

DATA = BUILTIN_DIR / "data"


def rows(name):
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_size_balance_and_split():
    train, held = rows("sentiment_train.jsonl"), rows("sentiment_heldout.jsonl")
    assert len(train) + len(held) >= 1500
    cells = Counter((r["domain"], r["label"]) for r in train + held)
    assert set(cells) == {(d, l) for d in ("customer_service", "financial") for l in ("negative", "neutral", "positive")}
    assert len(set(cells.values())) == 1, f"unbalanced: {cells}"
    held_cells = Counter((r["domain"], r["label"]) for r in held)
    assert len(set(held_cells.values())) == 1 and len(held) >= 300
    texts = [r["text"] for r in train + held]
    assert len(set(texts)) == len(texts), "duplicate sentences"
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    lengths = sorted(len(t.split()) for t in texts)
    assert lengths[0] <= 6 and lengths[-1] >= 18, "phrasing and length should vary"


@pytest.mark.model
def test_heldout_accuracy_and_int8_agreement(engine, fast_engine):
    held = rows("sentiment_heldout.jsonl")
    texts = [r["text"] for r in held]
    ref = engine.classify(texts)
    accuracy = sum(p.label == r["label"] for p, r in zip(ref, held)) / len(held)
    shipped = json.loads((BUILTIN_DIR / "sentiment.json").read_text())["heldout"]["accuracy"]
    assert accuracy >= shipped - 0.02
    fast = fast_engine.classify(texts)
    assert sum(a.label == b.label for a, b in zip(ref, fast)) / len(texts) >= 0.99
