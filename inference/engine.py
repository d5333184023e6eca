"""The inference engine: tokenization, token-budget batches, one executor per device.

``classify`` tokenizes in the caller's thread, plans length-sorted batches
(:mod:`inference.batching`) and keeps up to two batches in flight per device
replica, so the next batch is padded while a device runs the current one.
Batches go to the least-loaded live replica. A replica that raises is taken
out and its batch reruns elsewhere; a CUDA out-of-memory error splits the
batch in two and retries.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from inference import metrics
from inference.batching import Batch, plan_batches
from inference.errors import DeviceError, InferenceError
from inference.model import ModelBundle
from inference.types import Prediction

Precision = Literal["auto", "fp32", "bf16", "fp16"]
_IN_FLIGHT_PER_REPLICA = 2
_WAIT_STEP_S = 30.0


@dataclass
class _Replica:
    name: str
    device: torch.device
    module: torch.nn.Module
    dtype: torch.dtype
    executor: ThreadPoolExecutor
    in_flight: int = 0
    alive: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)


def resolve_precision(precision: str, device: str) -> torch.dtype:
    """The compute dtype for ``precision`` on ``device`` (``auto``: bf16/fp16 on GPU, fp32 on CPU)."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise InferenceError(f"unknown precision {precision!r}; expected auto, fp32, bf16 or fp16")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.startswith("cpu"):
            raise InferenceError("precision='fp16' is not supported on CPU; use fp32 or bf16")
        return torch.float16
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class Engine:
    """Classifies texts with one model replicated over one or more devices.

    Thread-safe for one caller at a time per engine (calls are serialised).
    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        devices: Sequence[str],
        precision: str = "auto",
        max_batch_tokens: int = 16384,
        max_batch_size: int = 256,
        long_text: str = "truncate",
    ) -> None:
        if long_text != "truncate":
            raise InferenceError(f"long_text={long_text!r} is not supported; use 'truncate'")
        if not devices:
            raise DeviceError("no device given")
        self.bundle = bundle
        self.labels = bundle.labels
        self.model_name = bundle.name
        self.max_length = bundle.max_length
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self._call_lock = threading.Lock()
        self._replicas: list[_Replica] = []
        for i, dev in enumerate(devices):
            dtype = resolve_precision(precision, dev)
            device = torch.device(dev)
            module = bundle.module
            if device.type != "cpu" or dtype != torch.float32:
                module = copy.deepcopy(bundle.module) if len(devices) > 1 else bundle.module
                module = module.to(device=device, dtype=dtype if device.type != "cpu" else torch.float32)
            module.eval()
            self._replicas.append(
                _Replica(
                    name=f"{dev}#{i}",
                    device=device,
                    module=module,
                    dtype=dtype,
                    executor=ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nlpstream-{dev}-{i}"),
                )
            )
        self.devices = tuple(r.name for r in self._replicas)
        self._closed = False

    # -- public API -------------------------------------------------------
    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        """Label ``texts``; results are in the caller's order, one per text.

        Identical texts are computed once. Raises InferenceError when every
        device failed, DeviceError when the engine is closed.
        """
        if self._closed:
            raise DeviceError("engine is closed")
        if len(texts) == 0:
            return []
        unique: dict[str, int] = {}
        slots = [unique.setdefault(t, len(unique)) for t in texts]
        distinct = list(unique)
        with self._call_lock:
            probs = self._run(distinct)
        preds = [self._prediction(row) for row in probs]
        return [preds[s] for s in slots]

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, special tokens included, truncated to the model's maximum."""
        # A token covers at least one character; cutting very long texts first keeps
        # tokenization of megabyte inputs cheap without changing their first tokens
        # (except for texts made mostly of whitespace).
        limit = self.max_length * 64
        clipped = [t if len(t) <= limit else t[:limit] for t in texts]
        enc = self.bundle.tokenizer(
            clipped, truncation=True, max_length=self.max_length, add_special_tokens=True,
            return_attention_mask=False, return_token_type_ids=False,
        )
        return list(enc["input_ids"])

    def close(self) -> None:
        """Stop the device workers; later calls raise DeviceError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for replica in self._replicas:
            replica.executor.shutdown(wait=True)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------
    def _prediction(self, row: list[float]) -> Prediction:
        best = max(range(len(row)), key=row.__getitem__)
        return Prediction(label=self.labels[best], score=float(row[best]), probs=dict(zip(self.labels, row)))

    def _pad(self, ids: list[list[int]], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        pad_id = self.bundle.tokenizer.pad_token_id or 0
        width = batch.padded_length
        input_ids = torch.full((len(batch.indices), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch.indices), width), dtype=torch.long)
        for row, idx in enumerate(batch.indices):
            seq = ids[idx]
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return input_ids, mask

    def _forward(self, replica: _Replica, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        with torch.inference_mode():
            input_ids = input_ids.to(replica.device, non_blocking=True)
            mask = mask.to(replica.device, non_blocking=True)
            if replica.device.type == "cpu" and replica.dtype == torch.bfloat16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = replica.module(input_ids, mask)
            else:
                logits = replica.module(input_ids, mask)
            probs = torch.softmax(logits.float(), dim=-1).cpu()
        metrics.BATCH_SECONDS.labels(replica.name).observe(time.perf_counter() - start)
        return probs

    def _pick(self) -> _Replica:
        live = [r for r in self._replicas if r.alive]
        if not live:
            raise InferenceError("every device replica failed; see nlpstream_inference_device_failures_total")
        return min(live, key=lambda r: r.in_flight)

    def _run(self, texts: list[str]) -> list[list[float]]:
        ids = self.tokenize(texts)
        lengths = [len(x) for x in ids]
        pending: list[Batch] = plan_batches(lengths, self.max_batch_tokens, self.max_batch_size)
        pending.reverse()  # pop() takes the longest first
        results: list[list[float] | None] = [None] * len(texts)
        running: dict[Future[torch.Tensor], tuple[_Replica, Batch]] = {}
        while pending or running:
            while pending and self._pick().in_flight < _IN_FLIGHT_PER_REPLICA:
                batch = pending.pop()
                replica = self._pick()
                input_ids, mask = self._pad(ids, batch)
                metrics.BATCH_TEXTS.observe(len(batch.indices))
                metrics.BATCH_TOKENS.observe(batch.padded_tokens)
                metrics.PADDING_SHARE.observe(1.0 - int(mask.sum()) / max(1, mask.numel()))
                replica.in_flight += 1
                running[replica.executor.submit(self._forward, replica, input_ids, mask)] = (replica, batch)
            done, _ = wait(list(running), timeout=_WAIT_STEP_S, return_when=FIRST_COMPLETED)
            for fut in done:
                replica, batch = running.pop(fut)
                replica.in_flight -= 1
                try:
                    probs = fut.result()
                except torch.cuda.OutOfMemoryError:
                    metrics.DEVICE_FAILURES.labels(replica.name, "oom").inc()
                    pending.extend(self._split(batch, lengths))
                    if replica.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                except Exception:  # noqa: BLE001 - a failing device is taken out, the batch reruns elsewhere
                    metrics.DEVICE_FAILURES.labels(replica.name, "error").inc()
                    replica.alive = False
                    pending.append(batch)
                    self._pick()  # raises when no replica is left
                    continue
                for row, idx in enumerate(batch.indices):
                    results[idx] = probs[row].tolist()
        return [r if r is not None else [] for r in results]

    @staticmethod
    def _split(batch: Batch, lengths: list[int]) -> list[Batch]:
        if len(batch.indices) == 1:
            raise InferenceError("a single text does not fit in device memory")
        half = len(batch.indices) // 2
        parts = (batch.indices[:half], batch.indices[half:])
        return [Batch(p, max(lengths[i] for i in p)) for p in parts]
