import random

import pytest

from nlpstream.inference.batching import Batch, padding_share, plan_batches


def test_every_index_once_and_limits_hold():
    rng = random.Random(1)
    lengths = [rng.choice([5, 8, 12, 30, 64, 128, 256]) for _ in range(1000)]
    batches = plan_batches(lengths, max_batch_tokens=2048, max_batch_size=64)
    seen = sorted(i for b in batches for i in b.indices)
    assert seen == list(range(1000))
    for b in batches:
        assert len(b.indices) <= 64
        assert b.padded_length == max(lengths[i] for i in b.indices)
        assert b.padded_tokens <= 2048


def test_sorted_batches_pad_less_than_arrival_order():
    rng = random.Random(2)
    lengths = [rng.randint(4, 256) for _ in range(512)]
    planned = plan_batches(lengths, 1 << 30, 32)
    from nlpstream.inference.batching import Batch

    naive = [Batch(tuple(range(i, i + 32)), max(lengths[i : i + 32])) for i in range(0, 512, 32)]
    assert padding_share(lengths, planned) < padding_share(lengths, naive) / 3


def test_oversized_text_gets_its_own_batch():
    batches = plan_batches([10, 5000, 10], max_batch_tokens=100, max_batch_size=8)
    assert [b.indices for b in batches][0] == (1,)
    assert sorted(i for b in batches for i in b.indices) == [0, 1, 2]


def test_empty_and_invalid():
    assert plan_batches([], 100, 10) == []
    with pytest.raises(ValueError, match="max_batch_tokens"):
        plan_batches([1], 0, 10)


def test_no_torch_import():
    import subprocess
    import sys

    code = "import sys, inference.batching; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_should_dispatch():
    from nlpstream.inference.batching import should_dispatch

    assert should_dispatch(5000, 0, 4096, 10)
    assert should_dispatch(10, 11, 4096, 10)
    assert not should_dispatch(10, 5, 4096, 10)
    assert not should_dispatch(0, 100, 4096, 10)


def test_token_budget_adapts_only_with_a_target():
    from nlpstream.inference.batching import TokenBudget

    fixed = TokenBudget(4096)
    assert fixed.observe(4096, 1.0) == 4096
    adaptive = TokenBudget(4096, target_latency_ms=100, minimum=256, maximum=16384)
    for _ in range(20):
        adaptive.observe(4096, 0.4)  # 0.1 ms per token -> ~1000 tokens for 100 ms
    assert 900 <= adaptive.value <= 1100
    for _ in range(40):
        adaptive.observe(1000, 0.001)  # much faster device -> capped at maximum
    assert adaptive.value == 16384
    with pytest.raises(ValueError):
        TokenBudget(10, target_latency_ms=0)


def test_pad_batch_matches_a_row_by_row_padding():
    import torch

    from nlpstream.inference.engine import pad_batch

    seqs = [[101, 5, 6, 102], [101, 7, 102], [101, 102]]
    ids, mask = pad_batch(seqs, 5, 0)
    assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == (3, 5)
    assert ids.tolist() == [[101, 5, 6, 102, 0], [101, 7, 102, 0, 0], [101, 102, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    empty_ids, empty_mask = pad_batch([[]], 1, 3)
    assert empty_ids.tolist() == [[3]] and empty_mask.tolist() == [[0]]


def _greedy_plan(lengths, max_batch_tokens, max_batch_size, pad_tolerance=None):
    """The item-by-item greedy cut (reference for plan_batches' per-batch cut); with ``pad_tolerance``,
    a batch of at least max_batch_tokens / 16 padded tokens takes no text shorter than (1 - tolerance) x its longest."""
    from nlpstream.inference.batching import Batch

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current, longest = [], [], 0
    for idx in order:
        length = max(1, lengths[idx])
        too_short = (pad_tolerance is not None and pad_tolerance < 1 and longest * len(current) >= max_batch_tokens / 16
                     and length < (1 - pad_tolerance) * longest)
        if current and (too_short or len(current) + 1 > max_batch_size
                        or max(longest, length) * (len(current) + 1) > max_batch_tokens):
            batches.append(Batch(tuple(current), longest))
            current, longest = [], 0
        current.append(idx)
        longest = max(longest, length)
    if current:
        batches.append(Batch(tuple(current), longest))
    return batches


def test_plan_batches_equals_the_item_by_item_greedy_cut():
    import random

    rng = random.Random(7)
    for _ in range(300):
        lengths = [rng.choice([0, 1, 2, rng.randint(1, 40), rng.randint(1, 600)]) for _ in range(rng.randint(0, 120))]
        tokens, size = rng.choice([1, 7, 64, 512, 2048]), rng.choice([1, 3, 32, 1024])
        assert plan_batches(lengths, tokens, size, pad_tolerance=None) == _greedy_plan(lengths, tokens, size)
        tolerance = rng.choice([0.0, 0.1, 0.5, 1.0, 1.5])
        assert plan_batches(lengths, tokens, size, pad_tolerance=tolerance) == _greedy_plan(lengths, tokens, size, tolerance)
    lengths = [30] * 10 + [20] * 10  # budget 640: the cut applies once a batch holds 40 tokens
    assert plan_batches(lengths, 640, 32) == plan_batches(lengths, 640, 32, pad_tolerance=0.1) == [
        Batch(tuple(range(10)), 30), Batch(tuple(range(10, 20)), 20)]
    assert plan_batches(lengths, 640, 32, pad_tolerance=None) == [Batch(tuple(range(20)), 30)]
    assert len(plan_batches([1] + [0] * 300, 2048, 1024)) == 1, "texts padded to 1 anyway are not cut"
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="pad_tolerance"):
            plan_batches([1, 2], 100, 10, pad_tolerance=bad)


def test_a_small_call_pads_little_with_the_tolerance_cut():
    """A micro-batch of 512 texts: the plain cut pads the long tail's batches to their longest text."""
    rng = random.Random(3)
    lengths = [min(256, int(rng.lognormvariate(3.2, 0.7)) + 2) for _ in range(512)]
    for tokens, size, most in ((2048, 32, 0.1), (65536, 1024, 0.3)):  # the GPU budget's 1/16 is 4096 tokens
        plain = plan_batches(lengths, tokens, size, pad_tolerance=None)
        cut = plan_batches(lengths, tokens, size)
        assert padding_share(lengths, cut) < most
        assert padding_share(lengths, cut) < padding_share(lengths, plain) / 2
        assert all(b.padded_tokens <= tokens and len(b.indices) <= size for b in cut)
        for b in cut:  # a batch holding a text padded by more than 10% is one still under 1/16 of the budget
            if any(lengths[i] < 0.9 * b.padded_length for i in b.indices):
                assert b.padded_length * (len(b.indices) - 1) < tokens / 16
