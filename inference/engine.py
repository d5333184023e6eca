"""The inference engine: dedup cache, tokenization, token-budget batches, one executor per device.

``classify`` serves repeated texts from the cache, tokenizes the rest in the
caller's thread (long texts truncated, or cut into overlapping windows whose
probabilities are averaged) and hands the token ids to
:mod:`inference.scheduler`, which plans length-sorted batches and keeps each
device replica busy with up to ``concurrency + 1`` batches in flight.

Failures (see the scheduler for the rules): a transient runner fault is
retried and changes nothing; a text that makes the model fail alone, twice,
on healthy devices is reported for that text only (:meth:`Engine.classify_each`
returns a :class:`TextError` in its place); a device that fails a known-good
probe is taken out and probed again with backoff; with no replica left
:class:`DeviceError` is raised. GPU replicas pick bf16 only where the device
runs it natively (compute capability 8.0 or newer), fp16 otherwise, and each
replica that does not run fp32 is checked against fp32 on a fixed sample at
start-up (:class:`AgreementError` below ``min_agreement``).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from importlib import resources
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np
import torch

from nlpstream.inference import metrics
from nlpstream.inference.batching import PAD_TOLERANCE, Batch, TokenBudget, plan_batches, should_dispatch
from nlpstream.inference.cache import PredictionCache
from nlpstream.inference.errors import AgreementError, DeviceError, InferenceError, TextError
from nlpstream.inference.model import ModelBundle
from nlpstream.inference.runtimes import OpenVINORunner, Runner, TorchRunner
from nlpstream.inference.scheduler import _WAIT_STEP_S, Replica, Scheduler
from nlpstream.inference.tokens import TokenIds
from nlpstream.inference.types import Prediction, predictions_of

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
LONG_TEXT = ("truncate", "chunk")
BF16_NATIVE = (8, 0)  # Ampere and newer run bf16 in hardware; older GPUs only emulate it (slowly)
log = logging.getLogger(__name__)
RunnerFactory = Callable[[str, torch.device], Runner]
Capability = Callable[[torch.device], tuple[int, int]]


# Engine's default batch limits (measured here: small batches keep CPU caches warm; GPUs want large ones)
CPU_BATCH_LIMITS = {"max_batch_tokens": 2048, "max_batch_size": 32}
GPU_BATCH_LIMITS = {"max_batch_tokens": 65536, "max_batch_size": 1024}
# plan_batches' pad_tolerance on CPU: with the CPU's small batches a device call's own cost outweighs the padding
# that 0.1 saved (measured on the builtin model, OpenVINO int8, alternating in one process: calls of 512 texts
# 530 against 904 texts/s, one call of 3,000 891 against 1,038); GPUs keep batching.PAD_TOLERANCE (0.1)
CPU_PAD_TOLERANCE = 0.3


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of one CUDA device (not device 0's for all)."""
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


def precision_mode(precision: str, device: str, openvino: bool, openvino_int8: bool,
                   capability: tuple[int, int] | None = None) -> str:
    """The runtime and precision used for ``precision`` on ``device``.

    CPU: ``auto`` -> OpenVINO int8 with a bf16 agreement guard when OpenVINO
    and NNCF are installed, else PyTorch fp32; ``bf16`` -> OpenVINO bf16 (else
    PyTorch autocast). GPU (``capability`` is that device's compute
    capability): ``auto`` -> bf16 where it is native (8.0 or newer), else
    fp16; ``bf16`` on an older GPU is refused (it would be emulated).
    Raises InferenceError for unknown or unsupported combinations.
    """
    if precision not in PRECISIONS:
        raise InferenceError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if device.startswith("cuda"):
        if precision == "int8":
            raise InferenceError("precision='int8' is for CPU; use bf16 or fp16 on GPU")
        native_bf16 = capability is not None and tuple(capability) >= BF16_NATIVE
        if precision == "auto":
            return "torch-bf16" if native_bf16 else "torch-fp16"
        if precision == "bf16" and not native_bf16:
            raise InferenceError(f"precision='bf16' on {device} (compute capability {_cc(capability)}) would be "
                                 "emulated and slow; use fp16, fp32 or auto (bf16 needs 8.0 or newer)")
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


def pad_batch(seqs: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded int64 ``(input_ids, attention_mask)`` of ``seqs`` (each at most ``width`` long)."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    mask = np.arange(width, dtype=np.int64)[None, :] < lengths[:, None]
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    input_ids[mask] = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))


def _cc(capability: tuple[int, int] | None) -> str:
    return "unknown" if capability is None else f"{capability[0]}.{capability[1]}"


def agreement_sample(n: int) -> list[str]:
    """A fixed, varied sample of ``n`` short English texts (shipped sentences, every k-th line)."""
    path = resources.files("nlpstream.inference.builtin").joinpath("data/sentiment_heldout.jsonl")
    lines = [json.loads(x)["text"] for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    step = max(1, len(lines) // max(1, n))
    return lines[::step][:n]


def batch_encoder(backend: Any) -> Callable[..., list[Any]]:
    """The Rust tokenizer's fastest batch encode: ``encode_batch_fast`` (no offsets) where it exists."""
    return getattr(backend, "encode_batch_fast", None) or backend.encode_batch


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
        min_agreement: float = 0.9,
        agreement_sample: int = 64,
        probe_backoff_s: float = 1.0,
        attempt_timeout_s: float = 300.0,
        runner_factory: RunnerFactory | None = None,
        capability: Capability | None = None,
    ) -> None:
        """``min_agreement``: the least share of the fixed start-up sample whose label on a replica
        that does not run fp32 must equal the fp32 label (0 turns the check off);
        ``agreement_sample``: that sample's size; ``probe_backoff_s``: first wait before a
        replica that is down is probed again; ``attempt_timeout_s``: a device call that has not
        returned by then takes its replica out (a hung device). ``runner_factory(mode, device)`` and
        ``capability(device)`` replace how runners are built and GPUs are queried (tests,
        custom runtimes)."""
        if long_text not in LONG_TEXT:
            raise InferenceError(f"long_text={long_text!r}; expected 'truncate' or 'chunk'")
        if not devices:
            raise DeviceError("no device given")
        if not 0.0 <= min_agreement <= 1.0:
            raise InferenceError(f"min_agreement ({min_agreement}) must be between 0 and 1")
        self.bundle = bundle
        self.labels = bundle.labels
        self.heads = bundle.head_labels  # (name, labels) per head; the first is the main one
        self.segments: tuple[int, ...] = tuple(len(labels) for _, labels in self.heads)
        self._bounds = [(sum(self.segments[:k]), sum(self.segments[: k + 1])) for k in range(len(self.segments))]
        self.model_name = bundle.name
        self.max_length = bundle.max_length
        on_gpu = any(str(d).startswith("cuda") for d in devices)
        limits = GPU_BATCH_LIMITS if on_gpu else CPU_BATCH_LIMITS
        max_batch_tokens = max_batch_tokens or limits["max_batch_tokens"]
        self.max_batch_size = max_batch_size or limits["max_batch_size"]
        self.long_text = long_text
        self.chunk_overlap = max(0, min(chunk_overlap, self.max_length // 2))
        self.max_batch_delay_ms = max_batch_delay_ms
        self.budget = TokenBudget(max_batch_tokens, target_latency_ms)
        self.pad_tolerance = PAD_TOLERANCE if on_gpu else CPU_PAD_TOLERANCE  # every batch plan of this engine
        self.cache = PredictionCache(bundle.name, cache_entries, cache_bytes)
        metrics.DEVICE_FAILURES.labels("guard", "error")  # the int8 guard's failures (at 0 from start-up)
        if self.cache.enabled:  # both series exist at 0 from start-up
            metrics.CACHE_REQUESTS.labels("hit")
            metrics.CACHE_REQUESTS.labels("miss")
        self._call_lock = threading.Lock()
        # large calls are tokenized in parts of this many texts, the next part while the current one runs
        # (4096 with a GPU's limits: measured faster than 8192 and 2048, see the README's "Inference engine")
        self._part_texts = max(2048, 4 * self.max_batch_size)
        self._tokenizer_thread: ThreadPoolExecutor | None = None
        self._collector: _Collector | None = None
        self._runner_factory = runner_factory or self._make_runner
        self._capability = capability or cuda_capability
        self._closed = False
        self._replicas = self._build_replicas(list(devices), precision)
        probe_ids = self.tokenize(["The service was fine, thanks."])
        self._scheduler = Scheduler(self._replicas, self.budget, self.max_batch_size, self._pad,
                                    lambda r, i, m: self._forward(r, i, m),
                                    probe=self._pad(probe_ids, Batch((0,), len(probe_ids[0]))),
                                    probe_backoff_s=probe_backoff_s, attempt_timeout_s=attempt_timeout_s,
                                    pad_tolerance=self.pad_tolerance)
        self.devices = tuple(r.name for r in self._replicas)
        self.modes = {r.name: r.runner.name for r in self._replicas}
        self.agreement: dict[str, float] = {}
        try:
            if min_agreement > 0:
                self._check_agreement(min_agreement, agreement_sample)
        except BaseException:
            self._scheduler.close()
            raise
        self.last_tokens = 0  # deprecated: tokens of the latest call; classify_counted returns them with the results

    # -- construction -----------------------------------------------------
    def _build_replicas(self, devices: list[str], precision: str) -> list[Replica]:
        from nlpstream.inference import openvino_backend as ovb

        has_ov = any(d.startswith("cpu") for d in devices) and ovb.available()
        has_nncf = has_ov and ovb.available(int8=True)
        cpu_count = sum(d.startswith("cpu") for d in devices)
        shared: dict[str, Runner] = {}
        replicas = []
        for i, dev in enumerate(devices):
            device = torch.device(dev)
            capability = self._capability(device) if device.type == "cuda" else None
            mode = precision_mode(precision, dev, has_ov, has_nncf, capability)
            if device.type == "cpu":  # CPU replicas share one runner and split its concurrency
                if mode not in shared:
                    shared[mode] = self._runner_factory(mode, device)
                runner = shared[mode]
                concurrency = max(1, runner.concurrency // cpu_count)
            else:
                runner = self._runner_factory(mode, device)
                concurrency = runner.concurrency
            if capability is not None:
                log.info("%s: compute capability %s, %s", dev, _cc(capability), mode)
            replicas.append(Replica(
                name=f"{dev}#{i}", device=device, runner=runner, concurrency=concurrency,
                executor=ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"nlpstream-{dev}-{i}"),
            ))
        return replicas

    def _make_runner(self, mode: str, device: torch.device) -> Runner:
        if mode.startswith("openvino"):
            from nlpstream.inference import openvino_backend as ovb

            fp32, int8 = ovb.load_models(self.bundle, int8=mode == "openvino-int8")
            if int8 is None:
                return OpenVINORunner(ovb.compile_cpu(fp32, "bf16"), "openvino-bf16", segments=self.segments)
            return OpenVINORunner(ovb.compile_cpu(int8, "bf16"), "openvino-int8+bf16-guard",
                                  guard=ovb.compile_cpu(fp32, "bf16", latency=True), guard_margin=ovb.GUARD_MARGIN,
                                  segments=self.segments)
        dtype = {"torch-fp32": torch.float32, "torch-bf16": torch.bfloat16, "torch-fp16": torch.float16}[mode]
        module = self.bundle.module
        if device.type == "cuda":
            import copy

            module = copy.deepcopy(module).to(device=device, dtype=dtype)
        module.eval()
        return TorchRunner(module, device, dtype, self.segments)

    # -- public API -------------------------------------------------------
    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        """Label ``texts``; results are in the caller's order, one per text.

        Identical texts are computed once, and the cache serves texts seen
        before. Raises TextError (``index`` = the first such text) when a text
        fails alone on healthy devices (use :meth:`classify_each` to get the
        others' labels as well), DeviceError when no device replica is live or
        the engine is closed.
        """
        results = self.classify_each(texts)
        for i, result in enumerate(results):
            if isinstance(result, TextError):
                raise TextError(i, str(result)) from None
        return results  # type: ignore[return-value]

    def classify_each(self, texts: Sequence[str]) -> list[Prediction | TextError]:
        """Like :meth:`classify`, but a text that fails alone on healthy devices gets a TextError in its place.

        Only DeviceError (no replica live, engine closed) is raised; the texts
        of that call then have no result and must not be dead-lettered.
        """
        return self.classify_counted(texts)[0]

    def classify_counted(self, texts: Sequence[str]) -> tuple[list[Prediction | TextError], int]:
        """:meth:`classify_each` and the number of tokens computed for this call (cache hits excluded),
        returned together so concurrent callers never read each other's count."""
        if self._closed:
            raise DeviceError("engine is closed")
        if len(texts) == 0:
            return [], 0
        unique: dict[str, int] = {}
        slots = [unique.setdefault(t, len(unique)) for t in texts]
        distinct = list(unique)
        probs = np.full((len(distinct), sum(self.segments)), np.nan)  # one row per distinct text
        missing = range(len(distinct))
        keys = self.cache.keys(distinct) if self.cache.enabled else []
        if keys:
            hit_rows = self.cache.get_many(keys)
            missing = [i for i, r in enumerate(hit_rows) if r is None]
            for i, row in enumerate(hit_rows):
                if row is not None:
                    probs[i] = row
            metrics.CACHE_REQUESTS.labels("hit").inc(len(distinct) - len(missing))
            metrics.CACHE_REQUESTS.labels("miss").inc(len(missing))
        failed: dict[int, str] = {}
        tokens = 0
        if missing:
            with self._call_lock:
                computed, errors, tokens = self._classify_texts([distinct[i] for i in missing])
                self.last_tokens = tokens
            probs[list(missing)] = computed
            failed = {missing[j]: reason for j, reason in errors.items()}
            if keys:
                self.cache.put_many((keys[i], row) for j, (i, row) in enumerate(zip(missing, computed.tolist()))
                                    if j not in errors)
        preds = self._predictions(probs, failed)
        if not failed and len(distinct) == len(texts):  # every text once, none failed: preds is the answer
            return preds, tokens
        out: list[Prediction | TextError] = []
        for pos, s in enumerate(slots):
            p = preds[s]
            out.append(TextError(pos, str(p)) if isinstance(p, TextError) else p)
        return out, tokens

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
        backend = self._backend
        if backend is not None:  # the Rust tokenizer directly: no per-text conversion in Python
            return [e.ids for e in self._encodings(backend, texts)]
        return self._tokenize_slow(texts)

    def _encode(self, texts: Sequence[str]) -> TokenIds:
        """:meth:`tokenize` as one flat array (the Rust tokenizer's ids read once, no list per text)."""
        backend = self._backend
        if backend is not None:
            return TokenIds.from_encodings(self._encodings(backend, texts))
        return TokenIds.from_lists(self._tokenize_slow(texts))

    def _encodings(self, backend: Any, texts: Sequence[str]) -> list[Any]:
        """The Rust backend's encodings of ``texts`` (clipped, special tokens added, truncated by the backend).

        ``encode_batch_fast`` (tokenizers 0.20+) skips the character offsets the engine never reads: the same
        ids, 1.1-1.2x the texts a second here."""
        return batch_encoder(backend)(self._clip(texts), add_special_tokens=True)

    def _clip(self, texts: Sequence[str]) -> list[str]:
        # A token covers at least one character; cutting very long texts first keeps
        # tokenization of megabyte inputs cheap without changing their first tokens
        # (except for texts made mostly of whitespace).
        limit = self.max_length * 64
        return [t if len(t) <= limit else t[:limit] for t in texts]

    def _tokenize_slow(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.bundle.tokenizer(
            self._clip(texts), truncation=True, max_length=self.max_length, add_special_tokens=True,
            return_attention_mask=False, return_token_type_ids=False,
        )
        return list(enc["input_ids"])

    @functools.cached_property
    def _backend(self) -> Any:
        """A private copy of a fast tokenizer's Rust backend, truncating to ``max_length``, no padding; else None.

        Gives the same ids as the transformers call in :meth:`tokenize` (tested),
        without its per-text Python conversion.
        """
        inner = getattr(self.bundle.tokenizer, "backend_tokenizer", None)
        if inner is None or not hasattr(inner, "to_str"):
            return None
        try:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(inner.to_str())
            backend.no_padding()
            backend.enable_truncation(self.max_length)
            return backend
        except Exception as exc:  # noqa: BLE001 - the transformers call still works
            log.debug("no direct tokenizer backend: %s", exc)
            return None

    def close(self) -> None:
        """Stop the device workers; later calls raise DeviceError. Idempotent."""
        if self._closed:
            return
        if self._collector is not None:
            self._collector.stop()  # answers what is queued first
        self._closed = True
        self._scheduler.close()
        if self._tokenizer_thread is not None:
            self._tokenizer_thread.shutdown(wait=True)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------
    def _predictions(self, probs: np.ndarray, failed: dict[int, str]) -> list[Prediction | TextError]:
        """One Prediction per row of ``probs`` (a TextError for the rows in ``failed``).

        Labels and scores come from array operations over all rows at once;
        each row's ``probs`` dict is zipped from that row's list (measured:
        2.4 us a text against 4.3 us for a dict built from column lists), and
        the common case (one head, every row fine) skips the frozen
        dataclass's ``__init__`` (:func:`predictions_of`). A row holding a NaN
        or an infinity (none should reach here) goes through
        :meth:`_prediction` as before.
        """
        finite = np.isfinite(probs).all(axis=1).tolist()
        heads = []  # per head: labels, and the argmax, max and values of every row
        for (_, labels), (a, b) in zip(self.heads, self._bounds):
            part = probs[:, a:b]
            heads.append((labels, part.argmax(axis=1).tolist(), part.max(axis=1).tolist(), part.tolist()))
        names = [name for name, _ in self.heads[1:]]
        if not names and not failed and all(finite):  # the common case: one head, every row fine
            return predictions_of(*heads[0])  # type: ignore[return-value]
        out: list[Prediction | TextError] = []
        for i in range(len(probs)):
            if i in failed:
                out.append(TextError(i, failed[i]))
            elif not finite[i]:
                out.append(self._prediction(probs[i].tolist()))
            else:
                preds = [Prediction(labels[best[i]], score[i], dict(zip(labels, rows[i])))
                         for labels, best, score, rows in heads]
                first = preds[0]
                out.append(first if not names else
                           Prediction(first.label, first.score, first.probs, heads=dict(zip(names, preds[1:]))))
        return out

    def _prediction(self, row: list[float]) -> Prediction:
        if len(self.heads) == 1:
            score = max(row)
            return Prediction(label=self.labels[row.index(score)], score=float(score), probs=dict(zip(self.labels, row)))
        preds = []
        for (_, labels), (a, b) in zip(self.heads, self._bounds):
            part = row[a:b]
            score = max(part)
            preds.append(Prediction(label=labels[part.index(score)], score=float(score), probs=dict(zip(labels, part))))
        first = preds[0]
        return Prediction(first.label, first.score, first.probs,
                          heads={name: p for (name, _), p in zip(self.heads[1:], preds[1:])})

    def _margin(self, row: list[float]) -> float:
        """The smallest top-two probability gap over the heads (inf when no head has two labels)."""
        return min((_margin(row[a:b]) for a, b in self._bounds if b - a > 1), default=float("inf"))

    def _argmax(self, row: list[float]) -> tuple[int, ...]:
        """Label index per head; (-1,) when the row holds a NaN or an infinity."""
        if not all(v == v and abs(v) != float("inf") for v in row):
            return (-1,)
        return tuple(max(range(a, b), key=row.__getitem__) - a for a, b in self._bounds)

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

    def _tokenize_each(self, texts: list[str]) -> tuple[TokenIds, dict[int, str]]:
        """Token ids per text; when the tokenizer raises on the whole list, texts go one by one
        and those it raises on alone are returned as ``{index: reason}`` (with empty ids)."""
        try:
            return self._encode(texts), {}
        except Exception:  # noqa: BLE001 - isolate the texts the tokenizer refuses
            return self._tokenize_one_by_one(texts)

    def _tokenize_one_by_one(self, texts: list[str]) -> tuple[TokenIds, dict[int, str]]:
        """:meth:`_tokenize_each` of texts the tokenizer raised on together: each alone."""
        ids: list[list[int]] = []
        errors: dict[int, str] = {}
        for i, text in enumerate(texts):
            try:
                ids.append(self.tokenize([text])[0])
            except Exception as exc:  # noqa: BLE001 - reported for that text alone
                ids.append([])
                errors[i] = f"tokenizer: {type(exc).__name__}: {exc}"
        return TokenIds.from_lists(ids), errors

    def _classify_texts(self, texts: list[str]) -> tuple[np.ndarray, dict[int, str], int]:
        """Probabilities, one row per text (NaN where it failed), ``{index: reason}`` of failed texts, tokens computed."""
        if self.long_text == "truncate":
            if len(texts) < 2 * self._part_texts:
                return self._classify_part(*self._tokenize_each(texts))
            return self._classify_in_parts(texts)
        items: list[list[int]] = []
        owners: list[int] = []
        bad = {}
        for t_index, text in enumerate(texts):
            try:
                windows = self._windows(text)
            except Exception as exc:  # noqa: BLE001 - reported for that text alone
                bad[t_index] = f"tokenizer: {type(exc).__name__}: {exc}"
                continue
            items.extend(windows)
            owners.extend([t_index] * len(windows))
        item_probs, failures = self._run(TokenIds.from_lists(items))
        for j in failures:
            bad.setdefault(owners[j], failures[j])
        width = item_probs.shape[1]
        sums: list[list[float]] = [[0.0] * width for _ in texts]
        weights = [0.0] * len(texts)
        for j, (owner, ids_, row) in enumerate(zip(owners, items, item_probs.tolist())):
            if owner in bad or j in failures:
                continue
            w = float(len(ids_))
            weights[owner] += w
            sums[owner] = [s + w * p for s, p in zip(sums[owner], row)]
        out = np.full((len(texts), width), np.nan)
        for i in range(len(texts)):
            if i not in bad:
                out[i] = [s / (weights[i] or 1.0) for s in sums[i]]
        return out, bad, sum(len(x) for x in items)

    def _classify_part(self, ids: TokenIds, bad: dict[int, str]) -> tuple[np.ndarray, dict[int, str], int]:
        """:meth:`_classify_texts` of tokenized texts (``bad``: those the tokenizer refused, with empty ids)."""
        if not bad:
            rows, failures = self._run(ids)
            return rows, failures, sum(ids.lengths)
        good = [i for i in range(len(ids)) if i not in bad]
        sub = ids.take(good)
        rows, failures = self._run(sub)
        out = np.full((len(ids), rows.shape[1]), np.nan)
        out[good] = rows
        bad = dict(bad)
        for j, reason in failures.items():
            bad[good[j]] = reason
        return out, bad, sum(sub.lengths)

    def _classify_in_parts(self, texts: list[str]) -> tuple[np.ndarray, dict[int, str], int]:
        """:meth:`_classify_texts` of a large call: tokenizing part k+1 on a helper thread while part k runs.

        The Rust tokenizer releases the GIL, so its work overlaps the
        scheduling, padding and device work of the part before. Texts go
        longest first (by characters), so each part's length-sorted batches
        pad about as little as one plan over the whole call would.
        """
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        parts = [order[s : s + self._part_texts] for s in range(0, len(order), self._part_texts)]
        if self._tokenizer_thread is None:
            self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nlpstream-tokenize")
        helper = self._tokenizer_thread

        def tokenize(k: int) -> Future[Callable[[], tuple[TokenIds, dict[int, str]]]]:
            return helper.submit(self._tokenize_part, [texts[i] for i in parts[k]])

        out = np.full((len(texts), sum(self.segments)), np.nan)
        bad: dict[int, str] = {}
        tokens = 0
        upcoming = tokenize(0)
        try:
            for k, part in enumerate(parts):
                read_ids = upcoming.result()
                if k + 1 < len(parts):
                    upcoming = tokenize(k + 1)
                ids, refused = read_ids()  # here, while the helper thread encodes the next part
                rows, failed, part_tokens = self._classify_part(ids, refused)
                out[part] = rows
                bad.update((part[j], reason) for j, reason in failed.items())
                tokens += part_tokens
        finally:
            wait([upcoming])  # nothing of this call runs on after it returns or raises
        return out, bad, tokens

    def _tokenize_part(self, texts: list[str]) -> Callable[[], tuple[TokenIds, dict[int, str]]]:
        """On the helper thread: the Rust tokenizer's encodings of one part; returns the function that
        reads their ids (:meth:`_tokenize_each`'s answer), called on the caller's thread.

        Reading the ids holds the GIL, so the caller does it while the helper
        thread encodes the next part (at the peak, two parts' encodings are
        alive). Without a Rust backend the part goes through
        :meth:`_tokenize_each` here; texts of a part the tokenizer raised on
        are tokenized one by one here.
        """
        backend = self._backend
        if backend is None:
            answer = self._tokenize_each(texts)
        else:
            try:
                encodings = self._encodings(backend, texts)
            except Exception:  # noqa: BLE001 - isolate the texts the tokenizer refuses
                answer = self._tokenize_one_by_one(texts)
            else:
                return lambda: (TokenIds.from_encodings(encodings), {})
        return lambda: answer

    def _pad(self, ids: Sequence[Sequence[int]], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of one batch, built with array operations, not per row."""
        if isinstance(ids, TokenIds):
            return ids.pad(batch.indices, batch.padded_length, self._pad_id)
        return pad_batch([ids[i] for i in batch.indices], batch.padded_length, self._pad_id)

    @functools.cached_property
    def _pad_id(self) -> int:
        return self.bundle.tokenizer.pad_token_id or 0  # read once: a transformers tokenizer attribute is slow

    def _forward(self, replica: Replica, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return replica.runner(input_ids, mask)

    def _run(self, ids: TokenIds) -> tuple[np.ndarray, dict[int, str]]:
        """Probabilities, one row per item (NaN where it failed), and ``{index: reason}`` of failed items."""
        if not len(ids):
            return np.zeros((0, sum(self.segments))), {}
        probs, failures = self._scheduler.run_array(ids, ids.lengths, width=sum(self.segments))
        self._guard(ids, probs)
        return probs, failures

    def _guard(self, ids: TokenIds, probs: np.ndarray) -> None:
        """Rerun the rows whose top-two margin is below the runner's guard margin through its guard graph.

        Done once per call, in length-sorted batches, so the reruns batch as
        well as the first pass. A guard graph that raises leaves the first
        pass's rows as they are (counted in ``nlpstream_inference_device_failures_total``).
        Rows of failed items (NaN) are left alone.
        """
        runner = next((r.runner for r in self._replicas if r.alive and getattr(r.runner, "guard", None) is not None), None)
        if runner is None:
            return
        margin = runner.guard_margin  # type: ignore[attr-defined]
        unsure = np.flatnonzero(self._margins(probs) < margin).tolist()  # NaN rows compare False
        if not unsure:
            return
        metrics.GUARD_RERUNS.inc(len(unsure))
        sub = ids.take(unsure)
        for batch in plan_batches(sub.lengths, self.budget.value, self.max_batch_size, pad_tolerance=self.pad_tolerance):
            input_ids, mask = self._pad(sub, batch)
            try:
                reference = runner.reference(input_ids, mask)  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - the first pass's labels stand
                metrics.DEVICE_FAILURES.labels("guard", "error").inc()
                log.warning("guard graph failed, keeping int8 labels for %d texts: %s", len(batch.indices), exc)
                continue
            if not bool(torch.isfinite(reference).all()):
                continue
            probs[[unsure[idx] for idx in batch.indices]] = reference.detach().to("cpu", torch.float64).numpy()

    def _margins(self, probs: np.ndarray) -> np.ndarray:
        """:meth:`_margin` of every row of ``probs`` at once (NaN for a row holding NaN)."""
        out = np.full(len(probs), np.inf)
        for a, b in self._bounds:
            if b - a > 1:
                top = np.sort(probs[:, a:b], axis=1)[:, -2:]
                out = np.minimum(out, top[:, 1] - top[:, 0])  # NaN stays NaN
        return out

    def _check_agreement(self, min_agreement: float, size: int) -> None:
        """Compare each replica's labels on a fixed sample with fp32's; export and log the share.

        Runs for every distinct runner that is not fp32 PyTorch (GPU bf16/fp16,
        CPU OpenVINO or bf16). Raises AgreementError below ``min_agreement``.
        """
        checked = [r for r in self._replicas if r.runner.name != "torch-float32"]
        if not checked:
            return
        texts = agreement_sample(size)
        ids = self.tokenize(texts)
        batches = plan_batches([len(x) for x in ids], self.budget.value, self.max_batch_size,
                               pad_tolerance=self.pad_tolerance)
        reference = self._runner_factory("torch-fp32", torch.device("cpu"))
        expected = self._labels_of(reference, ids, batches)
        seen: dict[int, float] = {}
        for replica in checked:
            if id(replica.runner) not in seen:
                try:
                    got = self._labels_of(replica.runner, ids, batches)
                except Exception as exc:  # noqa: BLE001 - a replica that cannot run the sample cannot serve
                    raise DeviceError(f"{replica.name} ({replica.runner.name}) failed the start-up fp32 agreement "
                                      f"check: {type(exc).__name__}: {exc}") from exc
                seen[id(replica.runner)] = sum(a == b for a, b in zip(expected, got)) / len(expected)
            share = seen[id(replica.runner)]
            self.agreement[replica.name] = share
            metrics.FP32_AGREEMENT.labels(replica.name).set(share)
            log.info("%s (%s): labels agree with fp32 on %.1f%% of %d sample texts",
                     replica.name, replica.runner.name, 100 * share, len(expected))
            if share < min_agreement:
                raise AgreementError(
                    f"{replica.name} ({replica.runner.name}) agrees with fp32 on {share:.1%} of {len(expected)} "
                    f"sample texts, below min_agreement {min_agreement:.0%}; use precision='fp32' (or a "
                    "lower min_agreement if this model is known to be unsure)")

    def _labels_of(self, runner: Runner, ids: list[list[int]], batches: list[Batch]) -> list[tuple[int, ...]]:
        """Label index per head of every sample text, as the runner (and its guard) gives them."""
        labels: list[tuple[int, ...]] = [(-1,)] * len(ids)
        for batch in batches:
            input_ids, mask = self._pad(ids, batch)
            with torch.inference_mode():
                probs = runner(input_ids, mask)
            guard = getattr(runner, "guard", None)
            rows = probs.tolist()
            if guard is not None:  # the engine's int8 path as it runs: unsure rows through the guard graph
                reference = runner.reference(input_ids, mask).tolist()  # type: ignore[attr-defined]
                rows = [ref if self._margin(r) < runner.guard_margin else r  # type: ignore[attr-defined]
                        for r, ref in zip(rows, reference)]
            for row, idx in zip(rows, batch.indices):
                labels[idx] = self._argmax(row)
        return labels


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
            preds = self.engine.classify_each(texts)  # raises DeviceError once the engine is closed
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
            for _, fut, _ in pending:
                fut.set_exception(exc)
            return
        start = 0
        for batch, fut, _ in pending:
            mine = preds[start : start + len(batch)]
            start += len(batch)
            bad = next((i for i, p in enumerate(mine) if isinstance(p, TextError)), None)
            if bad is None:
                fut.set_result(mine)  # type: ignore[arg-type]
            else:
                fut.set_exception(TextError(bad, str(mine[bad])))
