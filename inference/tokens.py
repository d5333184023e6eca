"""Token ids of many texts in one flat array, padded per batch with array operations.

:class:`TokenIds` keeps the ids of a call as one int64 array and the length
of each text, instead of one Python list per text: the Rust tokenizer's ids
are read once per call, and a batch's padded ``(input_ids, attention_mask)``
is a gather from that array, not a walk over its rows.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch


_READ_CHUNK = 256  # texts whose id lists TokenIds.from_encodings holds at once


class TokenIds(Sequence[list[int]]):
    """The token ids of ``len(lengths)`` texts: text ``i`` is ``flat[starts[i] : starts[i] + lengths[i]]``.

    Reads like a list of id lists (``len``, indexing, iteration give lists);
    ``lengths`` is a plain list of ints for the scheduler's bookkeeping.
    """

    __slots__ = ("flat", "lengths", "_lens", "_starts")

    def __init__(self, flat: np.ndarray, lengths: list[int]) -> None:
        self.flat = flat
        self.lengths = lengths
        self._lens = np.asarray(lengths, dtype=np.int64)
        self._starts = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(self._lens[:-1], out=self._starts[1:])
        if int(self._lens.sum()) != len(flat):
            raise ValueError(f"{len(flat)} ids for lengths that add up to {int(self._lens.sum())}")

    @classmethod
    def from_lists(cls, seqs: Iterable[Sequence[int]]) -> "TokenIds":
        seqs = list(seqs)
        lengths = [len(s) for s in seqs]
        flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=sum(lengths))
        return cls(flat, lengths)

    @classmethod
    def from_encodings(cls, encodings: Sequence[Any]) -> "TokenIds":
        """From the Rust tokenizer's ``Encoding`` objects (``.ids`` of each, read once: a call into Rust per text).

        Read ``_READ_CHUNK`` texts at a time, so at most that many texts' Python id lists are alive at once.
        """
        lengths: list[int] = []
        chunks = []
        for start in range(0, len(encodings), _READ_CHUNK):
            ids = list(map(operator.attrgetter("ids"), encodings[start : start + _READ_CHUNK]))
            lens = list(map(len, ids))
            chunks.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=sum(lens)))
            lengths += lens
        return cls(np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64), lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> list[int]:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("TokenIds takes one index; use take() for several")
        start = int(self._starts[i])
        return self.flat[start : start + self.lengths[i]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.tolist())

    def tolist(self) -> list[list[int]]:
        ids = self.flat.tolist()
        out = []
        start = 0
        for n in self.lengths:
            out.append(ids[start : start + n])
            start += n
        return out

    def take(self, indices: Sequence[int]) -> "TokenIds":
        """The texts at ``indices``, in that order."""
        rows = np.asarray(indices, dtype=np.int64)
        if len(rows) == 0:
            return TokenIds(np.zeros(0, dtype=np.int64), [])
        lens = self._lens[rows]
        ends = np.cumsum(lens)
        pos = np.arange(int(ends[-1]), dtype=np.int64) + np.repeat(self._starts[rows] - (ends - lens), lens)
        return TokenIds(self.flat[pos], lens.tolist())

    def pad(self, indices: Sequence[int], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded int64 ``(input_ids, attention_mask)`` of the texts at ``indices`` (each at most ``width`` long)."""
        rows = np.asarray(indices, dtype=np.int64)
        cols = np.arange(width, dtype=np.int64)
        mask = cols[None, :] < self._lens[rows][:, None]
        input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        input_ids[mask] = self.flat[(self._starts[rows][:, None] + cols[None, :])[mask]]
        return torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))
