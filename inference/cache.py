"""A bounded LRU of predictions keyed by model and text content hash."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

_ENTRY_OVERHEAD = 200  # bytes per entry beyond the stored probabilities (key, node, list)


class PredictionCache:
    """Maps (model, text) to a probability row; bounded in entries and in bytes.

    ``max_entries == 0`` disables it. Thread-safe.
    """

    def __init__(self, model: str, max_entries: int = 100_000, max_bytes: int = 64 << 20) -> None:
        self.model = model
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._rows: OrderedDict[bytes, list[float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def key(self, text: str) -> bytes:
        return hashlib.blake2b(f"{self.model}\x00{text}".encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def get(self, key: bytes) -> list[float] | None:
        with self._lock:
            row = self._rows.get(key)
            if row is not None:
                self._rows.move_to_end(key)
            return row

    def put(self, key: bytes, row: list[float]) -> None:
        if not self.enabled:
            return
        size = _ENTRY_OVERHEAD + 8 * len(row)
        with self._lock:
            if key in self._rows:
                return
            self._rows[key] = row
            self._bytes += size
            while self._rows and (len(self._rows) > self.max_entries or self._bytes > self.max_bytes):
                _, old = self._rows.popitem(last=False)
                self._bytes -= _ENTRY_OVERHEAD + 8 * len(old)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def bytes(self) -> int:
        return self._bytes
