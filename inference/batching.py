"""Token-budget batching: pure CPU logic, no torch.

Texts are sorted by token length and cut into batches whose padded size
(``longest length x count``) stays within ``max_batch_tokens`` and whose count
stays within ``max_batch_size``. Sorting keeps padding small; the caller maps
results back to its own order through the indices each batch carries.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Batch:
    """Indices into the caller's list, longest first, and the padded length."""

    indices: tuple[int, ...]
    padded_length: int

    @property
    def padded_tokens(self) -> int:
        return self.padded_length * len(self.indices)


# A batch stops taking texts more than PAD_TOLERANCE shorter than its longest, once it
# holds at least 1/MIN_FILL_DIVISOR of the token budget: see plan_batches.
PAD_TOLERANCE = 0.1
MIN_FILL_DIVISOR = 16


def counted_lengths(lengths: Sequence[int], indices: Sequence[int]) -> list[int]:
    """The token count each text at ``indices`` is planned and counted with: its length, at least 1.

    Through ``map``, so no Python frame runs per text (the engine's host path calls this per batch).
    """
    return list(map(max, itertools.repeat(1, len(indices)), map(lengths.__getitem__, indices)))


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int, *,
                 pad_tolerance: float | None = PAD_TOLERANCE) -> list[Batch]:
    """Cut ``lengths`` (token counts per text) into length-sorted batches.

    Guarantees: every index appears in exactly one batch; each batch has at
    most ``max_batch_size`` items; its padded size is at most
    ``max_batch_tokens`` unless a single text is longer than the budget, in
    which case that text gets a batch of its own. Raises ValueError on
    non-positive limits.

    With ``pad_tolerance`` (default 0.1), a batch that already holds
    ``max_batch_tokens / 16`` padded tokens takes no text shorter than
    ``(1 - pad_tolerance)`` of its longest (lengths below 1 count as 1): a
    call of a few hundred texts then pads about as little as a call of
    thousands, at the price of a few more, smaller batches. ``None`` or a
    tolerance of 1 or more gives the plain cut (full batches only); a
    negative or NaN tolerance raises ValueError.
    """
    if max_batch_tokens <= 0 or max_batch_size <= 0:
        raise ValueError(f"max_batch_tokens ({max_batch_tokens}) and max_batch_size ({max_batch_size}) must be positive")
    if pad_tolerance is not None and not pad_tolerance >= 0:
        raise ValueError(f"pad_tolerance ({pad_tolerance}) must be 0 or more, or None")
    # longest first, ties in index order (a reverse sort keeps equal keys in their original order)
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    keep = None if pad_tolerance is None or pad_tolerance >= 1 else 1.0 - pad_tolerance
    descending = counted_lengths(lengths, order) if keep is not None else []
    min_fill = max_batch_tokens / MIN_FILL_DIVISOR
    batches: list[Batch] = []
    start = 0
    while start < len(order):
        # the first text of a batch is its longest, so its size follows from that length alone
        longest = max(1, lengths[order[start]])
        size = max(1, min(max_batch_size, max_batch_tokens // longest))
        if keep is not None and size > 1:
            filled = start + math.ceil(min_fill / longest)  # texts taken whatever their length
            if filled < start + size:
                # texts at least keep x longest long form a prefix of what follows (lengths descend)
                close = bisect.bisect_right(descending, -(keep * longest), lo=start, key=operator.neg)
                size = max(1, min(size, max(filled, close) - start))
        batches.append(Batch(tuple(order[start : start + size]), longest))
        start += size
    return batches


def padding_share(lengths: Sequence[int], batches: Sequence[Batch]) -> float:
    """Share of padded positions that are padding (0.0 = none)."""
    total = sum(b.padded_tokens for b in batches)
    if total == 0:
        return 0.0
    real = sum(sum(counted_lengths(lengths, b.indices)) for b in batches)
    return 1.0 - real / total


def should_dispatch(pending_tokens: int, oldest_wait_ms: float, max_batch_tokens: int, max_batch_delay_ms: float) -> bool:
    """Whether collected requests should go to the devices now: the token budget is
    full, or the oldest request has waited ``max_batch_delay_ms``."""
    return pending_tokens >= max_batch_tokens or (pending_tokens > 0 and oldest_wait_ms >= max_batch_delay_ms)


class TokenBudget:
    """The batch token budget; adapts to ``target_latency_ms`` when one is set.

    Keeps an exponential moving average of seconds per padded token and sets
    the budget so that a full batch takes about the target, within
    ``[minimum, maximum]``. Without a target the budget stays at ``initial``
    (throughput first).
    """

    def __init__(self, initial: int, target_latency_ms: float | None = None, minimum: int = 256,
                 maximum: int | None = None, smoothing: float = 0.3) -> None:
        if target_latency_ms is not None and target_latency_ms <= 0:
            raise ValueError(f"target_latency_ms ({target_latency_ms}) must be positive")
        self.value = initial
        self.target_s = None if target_latency_ms is None else target_latency_ms / 1000.0
        self.minimum = min(minimum, initial)
        self.maximum = maximum or initial * 4
        self.smoothing = smoothing
        self.seconds_per_token: float | None = None

    def observe(self, padded_tokens: int, seconds: float) -> int:
        """Record one batch; returns the new budget."""
        if self.target_s is None or padded_tokens <= 0 or seconds <= 0:
            return self.value
        rate = seconds / padded_tokens
        spt = self.seconds_per_token
        self.seconds_per_token = rate if spt is None else (1 - self.smoothing) * spt + self.smoothing * rate
        self.value = int(max(self.minimum, min(self.maximum, self.target_s / self.seconds_per_token)))
        return self.value
