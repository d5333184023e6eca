"""The engine's host side: results kept as arrays, predictions built from them (fake tokenizer and runners, no model)."""

from __future__ import annotations

import math

import numpy as np

from nlpstream.inference import TextError
from tests.inference.fakes import fake_engine


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
        margins = eng._margins(probs)
        assert [m for i, m in enumerate(margins.tolist()) if i != 26] == [
            eng._margin(r) for i, r in enumerate(rows) if i != 26]
        assert math.isnan(margins[26])
