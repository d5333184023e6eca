"""The inference engine: dedup cache, tokenization, token-budget batches, one executor per device.

``classify`` serves repeated texts from the cache, tokenizes the rest in the
caller's thread (long texts truncated, or cut into overlapping windows whose
probabilities are averaged), plans length-sorted batches
(:mod:`inference.batching`) and keeps each device replica busy with up to
``concurrency + 1`` batches in flight through :mod:`inference.scheduler`,
so the next batch is padded while a device runs the current one. Batches go
to the least-loaded live replica. A replica that raises is taken out and its
batch reruns elsewhere; a CUDA out-of-memory error splits the batch in two
and retries.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from inference import metrics
from inference.batching import Batch, TokenBudget, plan_batches, should_dispatch
from inference.cache import PredictionCache
from inference.errors import DeviceError, InferenceError
from inference.model import ModelBundle
from inference.runtimes import OpenVINORunner, Runner, TorchRunner
from inference.scheduler import _WAIT_STEP_S, Replica, Scheduler
from inference.types import Prediction

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
LONG_TEXT = ("truncate", "chunk")


def precision_mode(precision: str, device: str, openvino: bool, openvino_int8: bool) -> str:
    """The runtime and precision used for ``precision`` on ``device``.

    CPU: ``auto`` -> OpenVINO int8 with a bf16 agreement guard when OpenVINO
    and NNCF are installed, else PyTorch fp32; ``bf16`` -> OpenVINO bf16 (else
    PyTorch autocast). GPU: ``auto`` -> bf16 (fp16 where bf16 is missing).
    Raises InferenceError for unknown or unsupported combinations.
    """
    if precision not in PRECISIONS:
        raise InferenceError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if device.startswith("cuda"):
        if precision == "int8":
            raise InferenceError("precision='int8' is for CPU; use bf16 or fp16 on GPU")
        if precision == "auto":
            return "torch-bf16" if torch.cuda.is_bf16_supported() else "torch-fp16"
        return f"torch-{precision}"
    if precision == "fp16":
        raise InferenceError("precision='fp16' is not supported on CPU; use int8, bf16 or fp32")
    if precision == "int8":
        if not openvino_int8:
            raise InferenceError("precision='int8' on CPU needs the 'openvino' and 'nncf' packages")
        return "openvino-int8"
    if precision == "bf16":
        return "openvino-bf16" if openvino else "torch-bf16"
    if precision == "auto":
        return "openvino-int8" if openvino_int8 else "torch-fp32"
    return "torch-fp32"


class Engine:
    """Classifies texts with one model replicated over one or more devices.

    Calls are serialised; :meth:`submit` lets many callers share batches.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        devices: Sequence[str],
        precision: str = "auto",
        max_batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        long_text: str = "truncate",
        cache_entries: int = 100_000,
        cache_bytes: int = 64 << 20,
        target_latency_ms: float | None = None,
        max_batch_delay_ms: float = 5.0,
        chunk_overlap: int = 64,
    ) -> None:
        if long_text not in LONG_TEXT:
            raise InferenceError(f"long_text={long_text!r}; expected 'truncate' or 'chunk'")
        if not devices:
            raise DeviceError("no device given")
        self.bundle = bundle
        self.labels = bundle.labels
        self.model_name = bundle.name
        self.max_length = bundle.max_length
        on_gpu = any(str(d).startswith("cuda") for d in devices)
        # measured here: small batches keep CPU caches warm; GPUs want large ones
        max_batch_tokens = max_batch_tokens or (65536 if on_gpu else 2048)
        self.max_batch_size = max_batch_size or (1024 if on_gpu else 32)
        self.long_text = long_text
        self.chunk_overlap = max(0, min(chunk_overlap, self.max_length // 2))
        self.max_batch_delay_ms = max_batch_delay_ms
        self.budget = TokenBudget(max_batch_tokens, target_latency_ms)
        self.cache = PredictionCache(bundle.name, cache_entries, cache_bytes)
        self._call_lock = threading.Lock()
        self._collector: _Collector | None = None
        self._replicas = self._build_replicas(list(devices), precision)
        self._scheduler = Scheduler(self._replicas, self.budget, self.max_batch_size, self._pad,
                                    lambda r, i, m: self._forward(r, i, m))
        self.devices = tuple(r.name for r in self._replicas)
        self.modes = {r.name: r.runner.name for r in self._replicas}
        self._closed = False
        self.last_tokens = 0  # tokens computed by the latest classify call (cache hits excluded)

    # -- construction -----------------------------------------------------
    def _build_replicas(self, devices: list[str], precision: str) -> list[Replica]:
        from inference import openvino_backend as ovb

        has_ov = any(d.startswith("cpu") for d in devices) and ovb.available()
        has_nncf = has_ov and ovb.available(int8=True)
        cpu_count = sum(d.startswith("cpu") for d in devices)
        shared: dict[str, Runner] = {}
        replicas = []
        for i, dev in enumerate(devices):
            mode = precision_mode(precision, dev, has_ov, has_nncf)
            device = torch.device(dev)
            if device.type == "cpu":  # CPU replicas share one runner and split its concurrency
                if mode not in shared:
                    shared[mode] = self._make_runner(mode, device)
                runner = shared[mode]
                concurrency = max(1, runner.concurrency // cpu_count)
            else:
                runner = self._make_runner(mode, device)
                concurrency = runner.concurrency
            replicas.append(Replica(
                name=f"{dev}#{i}", device=device, runner=runner, concurrency=concurrency,
                executor=ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"nlpstream-{dev}-{i}"),
            ))
        return replicas

    def _make_runner(self, mode: str, device: torch.device) -> Runner:
        if mode.startswith("openvino"):
            from inference import openvino_backend as ovb

            fp32, int8 = ovb.load_models(self.bundle, int8=mode == "openvino-int8")
            if int8 is None:
                return OpenVINORunner(ovb.compile_cpu(fp32, "bf16"), "openvino-bf16")
            return OpenVINORunner(ovb.compile_cpu(int8, "bf16"), "openvino-int8+bf16-guard",
                                  guard=ovb.compile_cpu(fp32, "bf16", latency=True), guard_margin=ovb.GUARD_MARGIN)
        dtype = {"torch-fp32": torch.float32, "torch-bf16": torch.bfloat16, "torch-fp16": torch.float16}[mode]
        module = self.bundle.module
        if device.type == "cuda":
            import copy

            module = copy.deepcopy(module).to(device=device, dtype=dtype)
        module.eval()
        return TorchRunner(module, device, dtype)

    # -- public API -------------------------------------------------------
    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        """Label ``texts``; results are in the caller's order, one per text.

        Identical texts are computed once, and the cache serves texts seen
        before. Raises InferenceError when every device failed, DeviceError
        when the engine is closed.
        """
        if self._closed:
            raise DeviceError("engine is closed")
        if len(texts) == 0:
            return []
        unique: dict[str, int] = {}
        slots = [unique.setdefault(t, len(unique)) for t in texts]
        distinct = list(unique)
        rows: list[list[float] | None] = [None] * len(distinct)
        keys = [self.cache.key(t) for t in distinct] if self.cache.enabled else []
        if keys:
            for i, key in enumerate(keys):
                rows[i] = self.cache.get(key)
            hits = sum(r is not None for r in rows)
            metrics.CACHE_REQUESTS.labels("hit").inc(hits)
            metrics.CACHE_REQUESTS.labels("miss").inc(len(distinct) - hits)
        missing = [i for i, r in enumerate(rows) if r is None]
        self.last_tokens = 0
        if missing:
            with self._call_lock:
                computed = self._classify_texts([distinct[i] for i in missing])
            for i, row in zip(missing, computed):
                rows[i] = row
                if keys:
                    self.cache.put(keys[i], row)
        preds = [self._prediction(row) for row in rows]  # type: ignore[arg-type]
        return [preds[s] for s in slots]

    def submit(self, texts: Sequence[str]) -> Future[list[Prediction]]:
        """Queue ``texts`` to be batched with other callers' within ``max_batch_delay_ms``."""
        if self._closed:
            raise DeviceError("engine is closed")
        if self._collector is None:
            with self._call_lock:
                if self._collector is None:
                    self._collector = _Collector(self)
        return self._collector.add(list(texts))

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
        if self._collector is not None:
            self._collector.stop()  # answers what is queued first
        self._closed = True
        self._scheduler.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------
    def _prediction(self, row: list[float]) -> Prediction:
        best = max(range(len(row)), key=row.__getitem__)
        return Prediction(label=self.labels[best], score=float(row[best]), probs=dict(zip(self.labels, row)))

    @functools.cached_property
    def _specials(self) -> tuple[list[int], list[int]]:
        """(prefix, suffix) special tokens the tokenizer wraps one text in, e.g. [CLS] / [SEP] (computed once)."""
        specials = list(self.bundle.tokenizer("", add_special_tokens=True)["input_ids"])
        return (specials[:1], specials[1:]) if len(specials) >= 2 else ([], specials)

    def _windows(self, text: str) -> list[list[int]]:
        """Token windows of at most max_length, overlapping by ``chunk_overlap`` tokens."""
        body = self.bundle.tokenizer(text, add_special_tokens=False, truncation=False, return_attention_mask=False,
                                     return_token_type_ids=False)["input_ids"]
        prefix, suffix = self._specials
        room = self.max_length - len(prefix) - len(suffix)
        if len(body) <= room:
            return [prefix + body + suffix]
        step = max(1, room - self.chunk_overlap)
        starts = range(0, max(1, len(body) - self.chunk_overlap), step)
        return [prefix + body[s : s + room] + suffix for s in starts]

    def _classify_texts(self, texts: list[str]) -> list[list[float]]:
        if self.long_text == "truncate":
            return self._run(self.tokenize(texts))
        items: list[list[int]] = []
        owners: list[int] = []
        for t_index, text in enumerate(texts):
            windows = self._windows(text)
            items.extend(windows)
            owners.extend([t_index] * len(windows))
        item_rows = self._run(items)
        sums: list[list[float]] = [[0.0] * len(self.labels) for _ in texts]
        weights = [0.0] * len(texts)
        for owner, ids, row in zip(owners, items, item_rows):
            w = float(len(ids))
            weights[owner] += w
            sums[owner] = [s + w * p for s, p in zip(sums[owner], row)]
        return [[s / weights[i] for s in sums[i]] for i in range(len(texts))]

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

    def _forward(self, replica: Replica, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return replica.runner(input_ids, mask)

    def _run(self, ids: list[list[int]]) -> list[list[float]]:
        self.last_tokens = sum(len(x) for x in ids)
        rows = self._scheduler.run(ids)
        self._guard(ids, rows)
        return rows

    def _guard(self, ids: list[list[int]], rows: list[list[float]]) -> None:
        """Rerun the rows whose top-two margin is below the runner's guard margin through its guard graph.

        Done once per call, in length-sorted batches, so the reruns batch as well as the first pass.
        """
        runner = next((r.runner for r in self._replicas if r.alive and getattr(r.runner, "guard", None) is not None), None)
        if runner is None:
            return
        margin = runner.guard_margin  # type: ignore[attr-defined]
        unsure = [i for i, row in enumerate(rows) if len(row) > 1 and _margin(row) < margin]
        if not unsure:
            return
        metrics.GUARD_RERUNS.inc(len(unsure))
        sub = [ids[i] for i in unsure]
        for batch in plan_batches([len(x) for x in sub], self.budget.value, self.max_batch_size):
            input_ids, mask = self._pad(sub, batch)
            probs = runner.reference(input_ids, mask)  # type: ignore[attr-defined]
            for row, idx in enumerate(batch.indices):
                rows[unsure[idx]] = probs[row].tolist()


def _margin(row: list[float]) -> float:
    top = sorted(row)[-2:]
    return top[1] - top[0]


class _Collector:
    """Merges :meth:`Engine.submit` calls into shared batches (max_batch_delay_ms)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queue: queue.Queue[tuple[list[str], Future[list[Prediction]], float] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="nlpstream-collector", daemon=True)
        self._thread.start()

    def add(self, texts: list[str]) -> Future[list[Prediction]]:
        fut: Future[list[Prediction]] = Future()
        self._queue.put((texts, fut, time.monotonic()))
        return fut

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=_WAIT_STEP_S)

    def _loop(self) -> None:
        pending: list[tuple[list[str], Future[list[Prediction]], float]] = []
        stopping = False
        while not stopping or pending:
            tokens = sum(len(t) // 4 + 2 for texts, _, _ in pending for t in texts)
            oldest_ms = (time.monotonic() - pending[0][2]) * 1000 if pending else 0.0
            if pending and (stopping or should_dispatch(tokens, oldest_ms, self.engine.budget.value,
                                                        self.engine.max_batch_delay_ms)):
                self._dispatch(pending)
                pending = []
                continue
            timeout = max(0.0005, (self.engine.max_batch_delay_ms - oldest_ms) / 1000) if pending else 0.5
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                continue
            if item is None:
                stopping = True
            else:
                pending.append(item)

    def _dispatch(self, pending: list[tuple[list[str], Future[list[Prediction]], float]]) -> None:
        texts = [t for batch, _, _ in pending for t in batch]
        try:
            preds = self.engine.classify(texts)  # raises DeviceError once the engine is closed
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
            for _, fut, _ in pending:
                fut.set_exception(exc)
            return
        start = 0
        for batch, fut, _ in pending:
            fut.set_result(preds[start : start + len(batch)])
            start += len(batch)
