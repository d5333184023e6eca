"""Scheduling over device replicas: token-budget batches, least-loaded dispatch, failover, OOM split.

A :class:`Scheduler` takes token ids (already prepared by the engine), plans
length-sorted batches (:mod:`inference.batching`) and keeps each replica
busy with up to ``concurrency + 1`` batches in flight, so the next batch is
padded while a device runs the current one. It knows nothing of texts,
caches or labels.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from inference import metrics
from inference.batching import Batch, TokenBudget, plan_batches
from inference.errors import InferenceError
from inference.runtimes import Runner

_WAIT_STEP_S = 30.0
Pad = Callable[[list[list[int]], Batch], tuple[torch.Tensor, torch.Tensor]]
Forward = Callable[["Replica", torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Replica:
    """One runner on one device with its worker threads."""

    name: str
    device: torch.device
    runner: Runner
    executor: ThreadPoolExecutor
    concurrency: int = 1
    in_flight: int = 0
    alive: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)


class Scheduler:
    """Runs prepared token ids over ``replicas``; one :meth:`run` at a time (the engine serialises calls)."""

    def __init__(self, replicas: list[Replica], budget: TokenBudget, max_batch_size: int, pad: Pad,
                 forward: Forward) -> None:
        self.replicas = replicas
        self.budget = budget
        self.max_batch_size = max_batch_size
        self._pad = pad
        self._forward = forward

    def _timed(self, replica: Replica, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        probs = self._forward(replica, input_ids, mask)
        seconds = time.perf_counter() - start
        metrics.BATCH_SECONDS.labels(replica.name).observe(seconds)
        return probs, seconds

    def _pick(self) -> Replica:
        live = [r for r in self.replicas if r.alive]
        if not live:
            raise InferenceError("every device replica failed; see nlpstream_inference_device_failures_total")
        return min(live, key=lambda r: r.in_flight / r.concurrency)

    def run(self, ids: list[list[int]]) -> list[list[float]]:
        """Probabilities per item of ``ids``, in order."""
        lengths = [len(x) for x in ids]
        pending: list[Batch] = plan_batches(lengths, self.budget.value, self.max_batch_size)
        pending.reverse()  # pop() takes the longest first
        results: list[list[float] | None] = [None] * len(ids)
        running: dict[Future[tuple[torch.Tensor, float]], tuple[Replica, Batch]] = {}
        while pending or running:
            while pending and (r := self._pick()).in_flight < r.concurrency + 1:
                batch = pending.pop()
                input_ids, mask = self._pad(ids, batch)
                metrics.BATCH_TEXTS.observe(len(batch.indices))
                metrics.BATCH_TOKENS.observe(batch.padded_tokens)
                metrics.PADDING_SHARE.observe(1.0 - int(mask.sum()) / max(1, mask.numel()))
                r.in_flight += 1
                running[r.executor.submit(self._timed, r, input_ids, mask)] = (r, batch)
            metrics.QUEUE_DEPTH.set(len(pending) + len(running))
            done, _ = wait(list(running), timeout=_WAIT_STEP_S, return_when=FIRST_COMPLETED)
            for fut in done:
                replica, batch = running.pop(fut)
                replica.in_flight -= 1
                try:
                    probs, seconds = fut.result()
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
                metrics.TOKEN_BUDGET.set(self.budget.observe(batch.padded_tokens, seconds))
                for row, idx in enumerate(batch.indices):
                    results[idx] = probs[row].tolist()
        metrics.QUEUE_DEPTH.set(0)
        return [r if r is not None else [] for r in results]

    @staticmethod
    def _split(batch: Batch, lengths: list[int]) -> list[Batch]:
        if len(batch.indices) == 1:
            raise InferenceError("a single text does not fit in device memory")
        half = len(batch.indices) // 2
        parts = (batch.indices[:half], batch.indices[half:])
        return [Batch(p, max(lengths[i] for i in p)) for p in parts]

    def close(self) -> None:
        for replica in self.replicas:
            replica.executor.shutdown(wait=True)
