"""In-memory stand-ins for unit tests of scheduling and failure handling (beside the real-model tests).

A whitespace tokenizer and runners whose faults are scripted: transient,
poison token, dead device, out of memory, NaN output, wrong labels.
"""

from __future__ import annotations

import threading
import time
import zlib
from typing import Any

import torch

from nlpstream.inference.engine import Engine
from nlpstream.inference.model import ModelBundle

POISON = 666
NAN = 777
LABELS = ("a", "b", "c")


class FakeTokenizer:
    """``[CLS] word ids [SEP]``; the word POISON is id 666, NAN is id 777."""

    pad_token_id = 0

    def __call__(self, texts: Any, **kw: Any) -> dict[str, Any]:
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        specials = kw.get("add_special_tokens", True)
        limit = kw.get("max_length") if kw.get("truncation") else None
        out = []
        for text in batch:
            ids = [self.word_id(w) for w in text.split()]
            if specials:
                ids = [101, *ids, 102]
            out.append(ids[:limit] if limit else ids)
        return {"input_ids": out[0] if single else out}

    @staticmethod
    def word_id(word: str) -> int:
        return {"POISON": POISON, "NAN": NAN}.get(word, 200 + zlib.crc32(word.encode()) % 400)


def expected_label(ids: list[int]) -> str:
    return LABELS[sum(ids) % 3]


class FakeRunner:
    """Probabilities from the token ids (label = sum of real ids mod 3), with scripted faults."""

    concurrency = 1

    def __init__(self, name: str = "torch-bfloat16", device: str = "cpu", delay_s: float = 0.0) -> None:
        self.name = name
        self.device = torch.device(device)
        self.delay_s = delay_s
        self.fail_next = 0  # transient: the next N calls raise
        self.nan_next = 0  # the next N calls return NaN
        self.dead = False  # every call raises (probes too)
        self.poison = True  # a batch holding POISON raises
        self.oom_above: int | None = None  # padded tokens above which CUDA runs out of memory
        self.flip = False  # wrong labels
        self.hang_next = 0  # the next N calls block until ``unhang`` is set
        self.unhang = threading.Event()
        self.calls = 0
        self.ooms = 0
        self.released_on: list[str] = []
        self.ran_on: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.calls += 1
            self.ran_on.append(threading.current_thread().name)
            if self.dead:
                raise RuntimeError("CUDA error: unspecified launch failure (simulated)")
            if self.fail_next:
                self.fail_next -= 1
                raise RuntimeError("transient runner fault (simulated)")
            if self.oom_above is not None and input_ids.numel() > self.oom_above:
                self.ooms += 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            nan_now = self.nan_next > 0
            self.nan_next = max(0, self.nan_next - 1)
            hang_now = self.hang_next > 0
            self.hang_next = max(0, self.hang_next - 1)
        if hang_now:
            self.unhang.wait(30)
            raise RuntimeError("the device call returned only after a hang (simulated)")
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.poison and bool((input_ids == POISON).any()):
            raise RuntimeError("the model raises on this input (simulated)")
        sums = (input_ids * mask).sum(dim=1) % 3
        if self.flip:
            sums = (sums + 1) % 3
        probs = torch.full((input_ids.shape[0], 3), 0.1)
        probs[torch.arange(input_ids.shape[0]), sums] = 0.8
        if nan_now:
            probs[:] = float("nan")
        nan_rows = (input_ids == NAN).any(dim=1)
        probs[nan_rows] = float("nan")
        return probs

    def release(self) -> None:
        self.released_on.append(threading.current_thread().name)


def fake_bundle() -> ModelBundle:
    return ModelBundle(name="fake", module=None, tokenizer=FakeTokenizer(), labels=LABELS,  # type: ignore[arg-type]
                       max_length=64)


def fake_engine(devices: list[str], capabilities: dict[int, tuple[int, int]] | None = None,
                precision: str = "auto", runners: dict[str, FakeRunner] | None = None,
                **options: Any) -> tuple[Engine, dict[str, FakeRunner]]:
    """An Engine over fake runners; returns it and its runners by device (``cpu`` also serves as fp32 reference)."""
    made: dict[str, FakeRunner] = dict(runners or {})
    caps = capabilities or {}

    def factory(mode: str, device: torch.device) -> FakeRunner:
        """One runner per device (``cpu`` for CPU replicas and for the fp32 reference)."""
        key = str(device) if device.type == "cuda" else "cpu"
        name = {"torch-fp32": "torch-float32", "torch-bf16": "torch-bfloat16", "torch-fp16": "torch-float16"}.get(mode, mode)
        runner = made.setdefault(key, FakeRunner(name, key))
        runner.name = name
        return runner

    options.setdefault("cache_entries", 0)
    options.setdefault("probe_backoff_s", 0.05)
    engine = Engine(fake_bundle(), devices, precision, runner_factory=factory,
                    capability=lambda d: caps.get(d.index or 0, (9, 0)), **options)
    return engine, made
