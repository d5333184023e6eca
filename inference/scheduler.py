"""Scheduling over device replicas: token-budget batches, least-loaded dispatch, retries, failover, OOM split.

A :class:`Scheduler` takes token ids (already prepared by the engine), plans
length-sorted batches (:mod:`inference.batching`) and keeps each live replica
busy with up to ``concurrency + 1`` batches in flight, so the next batch is
padded while a device runs the current one. It knows nothing of texts,
caches or labels. Ties between equally loaded replicas go round-robin.

Failure semantics (each attempt runs on the replica's own worker thread and
never raises out of it):

- A batch that raises, or returns NaN or infinite probabilities, is followed
  on the same worker by a *probe*: a tiny known-good batch, tried twice.
- Probe fails: the device is gone. The replica is taken out (one WARNING,
  ``nlpstream_inference_replica_up`` 0), its batch goes back to the queue
  unchanged, and the replica is probed again after a backoff (1 s, doubling
  to 60 s) while other replicas work; it comes back when a probe answers.
- Probe passes: the device is fine and the batch is retried, on another
  replica where one is live (a transient fault changes nothing). A batch
  that fails again is split in halves; a single text is reported as a
  failure of that text alone when it failed alone three times, each time on
  a replica whose probe then passed (another replica first, where there is
  one), so two unlucky transient faults never cost a text its label.
- CUDA out of memory: a batch of several texts is split and that replica's
  token cap halves (and stays so); a single text is retried (three tries)
  before it is reported as not fitting. The cache is released on the
  replica's own worker thread.
- An attempt that has not returned after ``attempt_timeout_s`` (a hung
  device): the replica is taken out and the batch reruns elsewhere; the
  replica counts the hung call as in flight until it returns, and is not
  probed before that.
- No live replica left: :class:`NoLiveDeviceError` (a DeviceError).

Whatever raises inside :meth:`Scheduler.run`, every batch in flight is
collected and every replica's ``in_flight`` returns to zero.
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import torch

from nlpstream.inference import metrics
from nlpstream.inference.batching import PAD_TOLERANCE, Batch, TokenBudget, counted_lengths, plan_batches
from nlpstream.inference.errors import NoLiveDeviceError
from nlpstream.inference.runtimes import Runner

log = logging.getLogger(__name__)
_WAIT_STEP_S = 30.0
_DRAIN_S = 120.0
MAX_BACKOFF_S = 60.0
MIN_TOKEN_CAP = 256
Pad = Callable[[Sequence[Sequence[int]], Batch], tuple[torch.Tensor, torch.Tensor]]
Running = dict["Future[_Outcome]", tuple["Replica", "_Work | None", float]]  # future -> (replica, work or probe, start)
Forward = Callable[["Replica", torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteOutput(RuntimeError):
    """A runner returned NaN or infinite probabilities (fp16 overflow, a faulty device)."""


@dataclass
class Replica:
    """One runner on one device with its worker threads, and its health."""

    name: str
    device: torch.device
    runner: Runner
    executor: ThreadPoolExecutor
    concurrency: int = 1
    in_flight: int = 0
    alive: bool = True
    token_cap: int | None = None  # set after an out-of-memory error: batches above it are split first
    backoff_s: float = 0.0
    retry_at: float = 0.0  # monotonic time of the next probe while down
    busy_s: float = 0.0  # device seconds spent on successful batches (bench)
    padded_tokens: int = 0
    real_tokens: int = 0


@dataclass
class _Work:
    batch: Batch
    attempts: int = 0  # failures on healthy replicas so far
    avoid: str | None = None  # replica the last failure happened on


@dataclass(slots=True)
class _Outcome:
    kind: str  # ok | oom | error | nonfinite | probe
    probs: torch.Tensor | None = None
    seconds: float = 0.0
    error: str = ""
    healthy: bool = True


class Scheduler:
    """Runs prepared token ids over ``replicas``; one :meth:`run` at a time (the engine serialises calls).

    ``probe``: the known-good ``(input_ids, mask)`` batch that tells a gone
    device from a bad batch. ``probe_backoff_s``: the first wait before a
    replica that is down is probed again.
    """

    def __init__(self, replicas: list[Replica], budget: TokenBudget, max_batch_size: int, pad: Pad,
                 forward: Forward, probe: tuple[torch.Tensor, torch.Tensor], probe_backoff_s: float = 1.0,
                 attempt_timeout_s: float = 300.0, pad_tolerance: float | None = PAD_TOLERANCE) -> None:
        self.replicas = replicas
        self.budget = budget
        self.max_batch_size = max_batch_size
        self.pad_tolerance = pad_tolerance  # plan_batches' pad_tolerance
        self.probe_backoff_s = probe_backoff_s
        self._pad = pad
        self._forward = forward
        self._probe_batch = probe
        self.attempt_timeout_s = attempt_timeout_s
        self._last_pick = -1
        self._returned: queue.SimpleQueue[Replica] = queue.SimpleQueue()  # hung calls that came back at last
        for r in replicas:  # every series with known labels exists from start-up, at 0
            metrics.REPLICA_UP.labels(r.name).set(1)
            metrics.BATCH_SECONDS.labels(r.name)
            for kind in ("error", "nonfinite", "oom"):
                metrics.DEVICE_FAILURES.labels(r.name, kind)
        for reason in ("retry", "split", "device"):
            metrics.BATCH_RETRIES.labels(reason)

    # -- public ---------------------------------------------------------------
    def run(self, ids: Sequence[Sequence[int]],
            lengths: Sequence[int] | None = None) -> tuple[list[list[float] | None], dict[int, str]]:
        """Probabilities per item of ``ids`` (None where it failed) and ``{index: reason}`` of failed items.

        ``ids`` goes to ``pad`` as it is; ``lengths`` (token count per item) defaults to their lengths.
        An item fails only when it failed alone three times on replicas whose
        probe passed (see the module docstring). Raises DeviceError when no replica is live (nothing is left
        running then).
        """
        parts, failures = self._run(ids, lengths)
        results: list[list[float] | None] = [None] * len(ids)
        for indices, probs in parts:
            for row, idx in zip(probs.tolist(), indices):
                results[idx] = row
        return results, failures

    def run_array(self, ids: Sequence[Sequence[int]], lengths: Sequence[int] | None = None,
                  width: int = 0) -> tuple[np.ndarray, dict[int, str]]:
        """:meth:`run` with the probabilities as one float64 array, one row per item (NaN where it failed).

        ``width``: the row width when no item succeeded (else the runner's).
        """
        parts, failures = self._run(ids, lengths)
        if parts:
            width = parts[0][1].shape[1]
        out = np.full((len(ids), width), np.nan)
        if parts:
            rows = np.fromiter(itertools.chain.from_iterable(p[0] for p in parts), dtype=np.int64,
                               count=sum(len(p[0]) for p in parts))
            out[rows] = np.concatenate([p[1] for p in parts])
        return out, failures

    def _run(self, ids: Sequence[Sequence[int]],
             lengths: Sequence[int] | None) -> tuple[list[tuple[tuple[int, ...], np.ndarray]], dict[int, str]]:
        """``(indices, probabilities)`` of each batch that succeeded, and the failed items."""
        lengths = [len(x) for x in ids] if lengths is None else lengths
        pending = [_Work(b) for b in reversed(plan_batches(lengths, self.budget.value, self.max_batch_size,
                                                           pad_tolerance=self.pad_tolerance))]
        results: list[tuple[tuple[int, ...], np.ndarray]] = []
        failures: dict[int, str] = {}
        running: Running = {}
        try:
            while pending or running:
                self._collect_returned()
                self._probe_due(running)
                self._dispatch(ids, lengths, pending, running)
                if pending and not running:
                    raise NoLiveDeviceError(
                        f"no device replica is live ({self._states()}); "
                        "see nlpstream_inference_replica_up and nlpstream_inference_device_failures_total")
                metrics.QUEUE_DEPTH.set(len(pending) + len(running))
                done, _ = wait(list(running), timeout=min(_WAIT_STEP_S, self.attempt_timeout_s),
                               return_when=FIRST_COMPLETED)
                for fut in done:
                    replica, work, _ = running.pop(fut)
                    replica.in_flight -= 1
                    self._settle(replica, work, fut, lengths, pending, results, failures)
                self._abandon_hung(running, pending)
        finally:
            self._drain(running)
            metrics.QUEUE_DEPTH.set(0)
        return results, failures

    def close(self) -> None:
        """Stop the workers; waits for them unless a replica still has a hung call."""
        self._collect_returned()
        for replica in self.replicas:
            replica.executor.shutdown(wait=replica.in_flight == 0, cancel_futures=True)

    # -- dispatch -------------------------------------------------------------
    def _pick(self, avoid: str | None) -> Replica | None:
        """The least-loaded live replica (not ``avoid`` when another is live); ties round-robin."""
        live = [(i, r) for i, r in enumerate(self.replicas) if r.alive]
        if not live:
            return None
        candidates = [(i, r) for i, r in live if r.name != avoid] or live
        least = min(r.in_flight / r.concurrency for _, r in candidates)
        tied = [(i, r) for i, r in candidates if r.in_flight / r.concurrency == least]
        after = [(i, r) for i, r in tied if i > self._last_pick]
        i, replica = (after or tied)[0]
        self._last_pick = i
        return replica

    def _dispatch(self, ids: Sequence[Sequence[int]], lengths: Sequence[int], pending: list[_Work], running: Running) -> None:
        while pending:
            replica = self._pick(pending[-1].avoid)
            if replica is None or replica.in_flight >= replica.concurrency + 1:
                return
            work = pending.pop()
            cap = replica.token_cap
            if cap is not None and work.batch.padded_tokens > cap and len(work.batch.indices) > 1:
                pending.extend(reversed(self._split(work, lengths)))
                continue
            input_ids, mask = self._pad(ids, work.batch)
            metrics.BATCH_TEXTS.observe(len(work.batch.indices))
            metrics.BATCH_TOKENS.observe(work.batch.padded_tokens)
            real = sum(lengths[i] for i in work.batch.indices)  # the mask's ones, without a pass over it
            metrics.PADDING_SHARE.observe(1.0 - real / max(1, work.batch.padded_tokens))
            self._submit(running, replica, work, self._attempt, replica, input_ids, mask)

    def _probe_due(self, running: Running) -> None:
        """Send a probe to each down replica whose backoff has passed and that has nothing in flight."""
        now = time.monotonic()
        for replica in self.replicas:
            if not (replica.alive or replica.in_flight or now < replica.retry_at):
                self._submit(running, replica, None, self._probe_outcome, replica)

    @staticmethod
    def _submit(running: Running, replica: Replica, work: _Work | None, fn: Callable[..., _Outcome],
                *args: object) -> None:
        """Run ``fn(*args)`` on ``replica``'s worker, counted in its ``in_flight`` until collected."""
        replica.in_flight += 1
        try:
            fut = replica.executor.submit(fn, *args)
        except BaseException:
            replica.in_flight -= 1
            raise
        running[fut] = (replica, work, time.monotonic())

    # -- on the replica's worker thread ------------------------------------------
    def _attempt(self, replica: Replica, input_ids: torch.Tensor, mask: torch.Tensor) -> _Outcome:
        """Run one batch; never raises. After a failure, probe the device (same thread)."""
        start = time.perf_counter()
        kind, error = "ok", ""
        probs = None
        try:
            probs = self._forward(replica, input_ids, mask)
            if probs.shape[0] != input_ids.shape[0]:
                raise RuntimeError(f"the runner returned {probs.shape[0]} rows for a batch of {input_ids.shape[0]}")
            if not bool(torch.isfinite(probs).all()):
                raise NonFiniteOutput("the runner returned NaN or infinite probabilities")
        except torch.cuda.OutOfMemoryError as exc:
            kind, error = "oom", _describe(exc)
        except NonFiniteOutput as exc:
            kind, error = "nonfinite", _describe(exc)
        except Exception as exc:  # noqa: BLE001 - any runner fault: the probe below tells device from batch
            kind, error = "error", _describe(exc)
        seconds = time.perf_counter() - start
        if kind == "ok":
            metrics.BATCH_SECONDS.labels(replica.name).observe(seconds)
            return _Outcome("ok", probs, seconds)
        input_ids = mask = probs = None  # the failed batch's tensors go now, not with a held traceback
        if kind == "oom":
            self._release(replica)
            return _Outcome("oom", error=error)
        return _Outcome(kind, error=error, healthy=self._healthy(replica))

    def _probe_outcome(self, replica: Replica) -> _Outcome:
        return _Outcome("probe", healthy=self._healthy(replica))

    def _healthy(self, replica: Replica, tries: int = 2) -> bool:
        """True when the known-good probe batch runs and gives finite probabilities (up to ``tries``)."""
        for _ in range(tries):
            try:
                probs = self._forward(replica, *self._probe_batch)
                if bool(torch.isfinite(probs).all()):
                    return True
            except torch.cuda.OutOfMemoryError:
                self._release(replica)
            except Exception as exc:  # noqa: BLE001 - a failed probe is the answer
                log.debug("probe of %s failed: %s", replica.name, _describe(exc))
        return False

    @staticmethod
    def _release(replica: Replica) -> None:
        """Free the device's cached memory; called on the replica's own worker thread."""
        release = getattr(replica.runner, "release", None)
        if release is not None:
            try:
                release()
            except Exception as exc:  # noqa: BLE001 - releasing is best effort
                log.debug("releasing memory on %s failed: %s", replica.name, exc)

    # -- results ----------------------------------------------------------------
    def _settle(self, replica: Replica, work: _Work | None, fut: Future[_Outcome], lengths: Sequence[int],
                pending: list[_Work], results: list[tuple[tuple[int, ...], np.ndarray]],
                failures: dict[int, str]) -> None:
        try:
            out = fut.result()
        except Exception as exc:  # noqa: BLE001 - the executor itself failed (shut down): treat as a gone device
            out = _Outcome("error", error=_describe(exc), healthy=False)
        if work is None:  # a probe of a replica that is down
            self._probed(replica, out.healthy)
            return
        if out.kind == "ok":
            assert out.probs is not None
            metrics.TOKEN_BUDGET.set(self.budget.observe(work.batch.padded_tokens, out.seconds))
            replica.busy_s += out.seconds
            replica.padded_tokens += work.batch.padded_tokens
            replica.real_tokens += sum(counted_lengths(lengths, work.batch.indices))
            results.append((work.batch.indices, _float64_copy(out.probs)))
            return
        metrics.DEVICE_FAILURES.labels(replica.name, out.kind).inc()
        if out.kind == "oom":
            if len(work.batch.indices) > 1:  # too big, not bad: cap this device, split, keep the failure count
                cap = max(MIN_TOKEN_CAP, work.batch.padded_tokens // 2)
                if replica.token_cap is None or cap < replica.token_cap:
                    replica.token_cap = cap
                    metrics.DEVICE_TOKEN_CAP.labels(replica.name).set(cap)
                    log.warning("out of memory on %s at %d padded tokens; its batches are now capped at %d tokens",
                                replica.name, work.batch.padded_tokens, cap)
                metrics.BATCH_RETRIES.labels("split").inc()
                pending.extend(reversed(self._split(work, lengths)))
            elif work.attempts + 1 >= 3:  # one text, three tries, memory released before each
                self._report(work, f"{out.error} (a single text of {work.batch.padded_length} tokens does not fit)",
                             failures)
            else:
                metrics.BATCH_RETRIES.labels("retry").inc()
                pending.append(_Work(work.batch, work.attempts + 1, avoid=replica.name))
            return
        if not out.healthy:
            self._take_down(replica, f"a batch failed and a known-good probe failed too: {out.error}")
            metrics.BATCH_RETRIES.labels("device").inc()
            pending.append(_Work(work.batch, work.attempts))  # the device's fault, not the batch's
            return
        self._failed_on_healthy(replica, work, out.error, lengths, pending, failures)

    def _failed_on_healthy(self, replica: Replica, work: _Work, error: str, lengths: Sequence[int],
                           pending: list[_Work], failures: dict[int, str]) -> None:
        attempts = work.attempts + 1
        single = len(work.batch.indices) == 1
        if single and attempts >= 3:
            self._report(work, error, failures)
        elif single or attempts == 1:
            metrics.BATCH_RETRIES.labels("retry").inc()
            pending.append(_Work(work.batch, attempts, avoid=replica.name))
        else:
            metrics.BATCH_RETRIES.labels("split").inc()
            pending.extend(reversed(self._split(_Work(work.batch, attempts, replica.name), lengths)))

    @staticmethod
    def _report(work: _Work, error: str, failures: dict[int, str]) -> None:
        failures[work.batch.indices[0]] = error
        metrics.ITEM_FAILURES.inc()
        log.info("one input fails alone on healthy devices and is reported: %s", error)

    @staticmethod
    def _split(work: _Work, lengths: Sequence[int]) -> list[_Work]:
        """Halves of a batch; a half of several items keeps the failure count, a single item starts afresh."""
        half = len(work.batch.indices) // 2
        parts = (work.batch.indices[:half], work.batch.indices[half:])
        return [_Work(Batch(p, max(counted_lengths(lengths, p))), work.attempts if len(p) > 1 else 0, work.avoid)
                for p in parts]

    # -- health -------------------------------------------------------------------
    def _take_down(self, replica: Replica, error: str) -> None:
        if not replica.alive:
            return
        replica.alive = False
        replica.backoff_s = self.probe_backoff_s
        replica.retry_at = time.monotonic() + replica.backoff_s
        metrics.REPLICA_UP.labels(replica.name).set(0)
        log.warning("device replica %s is down (%s); probing it again in %.3gs", replica.name, error, replica.backoff_s)

    def _probed(self, replica: Replica, healthy: bool) -> None:
        if healthy:
            replica.alive = True
            replica.backoff_s = 0.0
            metrics.REPLICA_UP.labels(replica.name).set(1)
            log.warning("device replica %s answers again and is back in service", replica.name)
            return
        replica.backoff_s = min(MAX_BACKOFF_S, max(self.probe_backoff_s, replica.backoff_s * 2))
        replica.retry_at = time.monotonic() + replica.backoff_s
        log.debug("device replica %s still down; next probe in %.3gs", replica.name, replica.backoff_s)

    def _states(self) -> str:
        return ", ".join(f"{r.name} {'up' if r.alive else 'down'}" for r in self.replicas)

    def _abandon_hung(self, running: Running, pending: list[_Work]) -> None:
        """Take out replicas whose call has run past ``attempt_timeout_s``; their batches rerun elsewhere."""
        now = time.monotonic()
        for fut in [f for f, (_, _, started) in running.items() if now - started > self.attempt_timeout_s]:
            replica, work, _ = running.pop(fut)
            self._orphan(fut, replica)
            metrics.DEVICE_FAILURES.labels(replica.name, "timeout").inc()
            self._take_down(replica, f"a call did not return within {self.attempt_timeout_s:.3g}s")
            if work is not None:
                metrics.BATCH_RETRIES.labels("device").inc()
                pending.append(_Work(work.batch, work.attempts))

    def _orphan(self, fut: Future[_Outcome], replica: Replica) -> None:
        """Stop waiting for ``fut``; its replica counts it in flight until it returns (then collected)."""
        fut.add_done_callback(lambda _f, r=replica: self._returned.put(r))

    def _collect_returned(self) -> None:
        while True:
            try:
                replica = self._returned.get_nowait()
            except queue.Empty:
                return
            replica.in_flight -= 1

    def _drain(self, running: Running) -> None:
        """Collect whatever is still in flight (after an exception) so every counter returns to zero.

        A call still running after ``_DRAIN_S`` is orphaned: its replica counts
        it until it returns.
        """
        if not running:
            return
        done, _ = wait(list(running), timeout=_DRAIN_S)
        for fut in list(running):
            replica, work, _ = running.pop(fut)
            if fut not in done:
                log.error("a call on %s still running after %.0fs is left to finish on its own", replica.name, _DRAIN_S)
                self._orphan(fut, replica)
                continue
            replica.in_flight -= 1
            if work is None:
                try:
                    self._probed(replica, fut.result().healthy)
                except Exception:  # noqa: BLE001 - a probe that cannot be read changes nothing
                    pass


def _float64_copy(probs: torch.Tensor) -> np.ndarray:
    """A float64 copy of a batch's probabilities, taken now: a runner may reuse its output buffer."""
    if probs.dtype == torch.float32 and probs.device.type == "cpu" and not probs.requires_grad:
        return probs.numpy().astype(np.float64)  # the common case, without torch's dispatch
    return probs.detach().to("cpu", torch.float64, copy=True).numpy()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
