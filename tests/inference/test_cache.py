"""The prediction cache on its own: keys, LRU order and bounds, batch calls against one-at-a-time ones."""

from __future__ import annotations

import hashlib

from nlpstream.inference.cache import _ENTRY_OVERHEAD, PredictionCache


def test_cache_is_bounded_in_entries_and_bytes():
    cache = PredictionCache("m", max_entries=3, max_bytes=1 << 20)
    for i in range(10):
        cache.put(cache.key(str(i)), [0.1, 0.9])
    assert len(cache) == 3 and cache.get(cache.key("0")) is None and cache.get(cache.key("9")) == [0.1, 0.9]
    small = PredictionCache("m", max_entries=1000, max_bytes=1000)
    for i in range(100):
        small.put(small.key(str(i)), [0.5, 0.5])
    assert small.bytes <= 1000 and 0 < len(small) < 100
    assert PredictionCache("a").key("x") != PredictionCache("b").key("x")
    off = PredictionCache("m", max_entries=0)
    off.put(off.key("x"), [1.0])
    assert len(off) == 0


def test_cache_batch_calls_match_one_at_a_time():
    cache = PredictionCache("m", max_entries=3, max_bytes=1 << 20)
    texts = ["a", "b", "c", "d", "\udc80 lone surrogate"]
    keys = cache.keys(texts)
    assert keys == [hashlib.blake2b(f"m\x00{t}".encode("utf-8", "surrogatepass"), digest_size=16).digest()
                    for t in texts] == [cache.key(t) for t in texts]
    cache.put_many([(keys[0], [0.0]), (keys[1], [1.0]), (keys[1], [9.0]), (keys[2], [2.0])])  # a repeat keeps the first
    assert len(cache) == 3 and cache.bytes == 3 * (_ENTRY_OVERHEAD + 8)
    assert cache.get_many([keys[0], keys[3], keys[1]]) == [[0.0], None, [1.0]]  # 0 and 1 become the most recent
    cache.put_many([(keys[3], [3.0])])  # evicts the least recent: 2
    assert cache.get_many(keys[:4]) == [[0.0], [1.0], None, [3.0]] and len(cache) == 3
    assert cache.get_many([]) == [] and cache.keys([]) == []


def test_cache_batch_calls_at_the_edges():
    cache = PredictionCache("m", max_entries=2, max_bytes=1 << 20)
    keys = cache.keys(["", "x", "y", "z"])
    assert keys[0] == hashlib.blake2b(b"m\x00", digest_size=16).digest()  # the empty text has a key of its own
    cache.put_many((k, [float(i)]) for i, k in enumerate(keys))  # one call larger than max_entries: the newest stay
    assert cache.get_many(keys) == [None, None, [2.0], [3.0]] and cache.bytes == 2 * (_ENTRY_OVERHEAD + 8)
    small = PredictionCache("m", max_entries=100, max_bytes=2 * (_ENTRY_OVERHEAD + 16))
    small.put_many((k, [0.5, 0.5]) for k in keys)  # over max_bytes within one call
    assert len(small) == 2 and small.get_many(keys[2:]) == [[0.5, 0.5]] * 2 and small.bytes <= small.max_bytes
