"""Runners: what executes one padded batch on one device and returns probabilities.

- :class:`TorchRunner`: PyTorch on CPU or CUDA, fp32 / bf16 / fp16.
- :class:`OpenVINORunner` (CPU): OpenVINO bf16 or int8 (NNCF post-training
  quantization, calibrated on shipped text), exported once and cached. In
  int8 mode it carries a bf16 ``guard`` graph: the engine reruns every text
  whose top-two probability margin is below ``guard_margin`` through
  :meth:`OpenVINORunner.reference`, so labels agree with fp32 where int8 is
  unsure.

Every runner is thread-safe for ``concurrency`` simultaneous calls.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import numpy as np
import torch


def segment_softmax(logits: torch.Tensor, segments: tuple[int, ...] | None) -> torch.Tensor:
    """Softmax over each head's columns (``segments``: label counts per head; None = one head)."""
    logits = logits.float()
    if not segments or len(segments) == 1:
        return torch.softmax(logits, dim=-1)
    return torch.cat([torch.softmax(part, dim=-1) for part in torch.split(logits, list(segments), dim=-1)], dim=-1)


def _segment_softmax_np(logits: np.ndarray, segments: tuple[int, ...] | None) -> np.ndarray:
    logits = logits.astype(np.float32)
    parts = np.split(logits, np.cumsum(segments)[:-1], axis=-1) if segments and len(segments) > 1 else [logits]
    out = []
    for part in parts:
        part = part - part.max(axis=-1, keepdims=True)
        exp = np.exp(part)
        out.append(exp / exp.sum(axis=-1, keepdims=True))
    return out[0] if len(out) == 1 else np.concatenate(out, axis=-1)


class Runner(Protocol):
    """Executes ``(input_ids, attention_mask) -> probs`` (float32, CPU tensor); a multi-head model's
    probabilities are each head's softmax, side by side."""

    name: str
    concurrency: int

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...


class TorchRunner:
    """PyTorch execution; on CPU bf16 uses autocast, on CUDA the weights are cast."""

    concurrency = 1

    def __init__(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 segments: tuple[int, ...] | None = None) -> None:
        self.module = module
        self.device = device
        self.dtype = dtype
        self.segments = segments
        self.name = f"torch-{str(dtype).removeprefix('torch.')}"

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            input_ids = input_ids.to(self.device, non_blocking=True)
            mask = mask.to(self.device, non_blocking=True)
            if self.device.type == "cpu" and self.dtype == torch.bfloat16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = self.module(input_ids, mask)
            else:
                logits = self.module(input_ids, mask)
            return segment_softmax(logits, self.segments).cpu()

    def release(self) -> None:
        """Return this device's cached blocks to the driver (after out-of-memory; on the replica's worker)."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.empty_cache()


class OpenVINORunner:
    """OpenVINO CPU execution of a compiled model, one infer request per thread."""

    def __init__(self, compiled: Any, name: str, guard: Any | None = None, guard_margin: float = 0.0,
                 concurrency: int | None = None, segments: tuple[int, ...] | None = None) -> None:
        self.compiled = compiled
        self.segments = segments
        self.guard = guard
        self.guard_margin = guard_margin
        self.name = name
        self.concurrency = concurrency or max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._local = threading.local()
        self._warm_up()

    def _warm_up(self) -> None:
        """Run one tiny inference per graph on the constructing thread, before worker threads do.

        OpenVINO's Python binding sets up pybind11's numpy bridge lazily, in a
        function-local static whose initialiser releases and re-takes the GIL.
        When two worker threads reach it first at the same moment, one holds
        the static's guard and waits for the GIL while the other holds the GIL
        and waits for the guard: the process hangs for good (caught with
        ``py-spy dump --native`` on fresh workers hanging in their first batch,
        about one start in a hundred here). Doing it once here, single-threaded,
        removes the race.
        """
        ids = torch.ones((1, 4), dtype=torch.long)
        for graph in (self.compiled, self.guard):
            if graph is not None:
                self._infer(graph.create_infer_request(), ids, ids)

    def _request(self, compiled: Any, slot: str) -> Any:
        req = getattr(self._local, slot, None)
        if req is None:
            req = compiled.create_infer_request()
            setattr(self._local, slot, req)
        return req

    def _probs(self, logits: np.ndarray) -> np.ndarray:
        return _segment_softmax_np(logits, self.segments)

    @staticmethod
    def _infer(request: Any, input_ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        # share_inputs: the request reads the int64 arrays in place (they are fresh per batch and
        # not touched until infer returns) instead of copying them into its own tensors through
        # numpy, a step that runs under the GIL in each worker thread and is not needed here
        ids, attention = np.ascontiguousarray(input_ids.numpy()), np.ascontiguousarray(mask.numpy())
        out = request.infer({"input_ids": ids, "attention_mask": attention}, share_inputs=True)
        return next(iter(out.values()))

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._probs(self._infer(self._request(self.compiled, "main"), input_ids, mask)))

    def reference(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Probabilities from the bf16 guard graph (the engine reruns unsure texts through it)."""
        return torch.from_numpy(self._probs(self._infer(self._request(self.guard, "guard"), input_ids, mask)))
