"""TokenIds: one flat id array per call, read like a list of id lists and padded per batch."""

from __future__ import annotations

import random

import numpy as np
import pytest

from nlpstream.inference.engine import pad_batch
from nlpstream.inference.tokens import _READ_CHUNK, TokenIds


def _seqs(seed: int = 3, n: int = 50) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(1, 30000) for _ in range(rng.choice([0, 1, 2, rng.randint(3, 70)]))] for _ in range(n)]


class _Encoding:
    """What TokenIds reads from the Rust tokenizer's Encoding: ``len`` and ``ids``."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)


def test_reads_like_the_lists_it_was_built_from():
    seqs = _seqs()
    ids = TokenIds.from_lists(seqs)
    assert len(ids) == len(seqs) and ids.lengths == [len(s) for s in seqs]
    assert ids.tolist() == seqs and list(ids) == seqs and [ids[i] for i in range(len(seqs))] == seqs
    assert ids.flat.dtype == np.int64
    assert TokenIds.from_encodings([_Encoding(s) for s in seqs]).tolist() == seqs
    empty = TokenIds.from_lists([])
    assert len(empty) == 0 and empty.tolist() == []
    with pytest.raises(ValueError):
        TokenIds(np.zeros(3, dtype=np.int64), [1, 1])


def test_take_keeps_the_chosen_texts_in_order():
    seqs = _seqs(5)
    ids = TokenIds.from_lists(seqs)
    picks = [7, 0, 7, 49, 3, 12]
    taken = ids.take(picks)
    assert taken.tolist() == [seqs[i] for i in picks] and taken.lengths == [len(seqs[i]) for i in picks]
    assert ids.take([]).tolist() == []
    assert ids.take([i for i, s in enumerate(seqs) if not s]).tolist() == [s for s in seqs if not s]


def test_pad_equals_pad_batch_of_the_same_rows():
    seqs = _seqs(11, 80)
    ids = TokenIds.from_lists(seqs)
    rng = random.Random(2)
    for _ in range(50):
        rows = rng.sample(range(len(seqs)), rng.randint(1, 20))
        width = max(1, max(len(seqs[i]) for i in rows)) + rng.choice([0, 0, 3])
        got_ids, got_mask = ids.pad(tuple(rows), width, 9)
        want_ids, want_mask = pad_batch([seqs[i] for i in rows], width, 9)
        assert got_ids.dtype == want_ids.dtype and got_mask.dtype == want_mask.dtype
        assert got_ids.tolist() == want_ids.tolist() and got_mask.tolist() == want_mask.tolist()


def test_from_encodings_reads_across_its_chunks():
    rng = random.Random(3)
    seqs = [[rng.randrange(30_000) for _ in range(rng.randrange(0, 9))] for _ in range(2 * _READ_CHUNK + 37)]
    ids = TokenIds.from_encodings([_Encoding(s) for s in seqs])
    assert ids.tolist() == seqs and ids.lengths == [len(s) for s in seqs] and ids.flat.dtype == np.int64
    empty = TokenIds.from_encodings([])
    assert len(empty) == 0 and empty.flat.dtype == np.int64
