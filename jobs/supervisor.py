"""``nlpstream stream --workers N``: N stream-job processes of one consumer group under one supervisor.

One Python process feeds about one fast GPU (see the README's Performance
section); a host with several runs one worker per device. The supervisor:

- starts each worker as its own process (``nlpstream stream-worker``) with
  the same configuration, its share of an explicit device list
  (:func:`split_devices`; ``cuda`` and ``auto`` on a machine with GPUs
  count as the list of them all) and a private ``/metrics`` port on
  127.0.0.1;
  the workers join the same consumer group, so Kafka spreads the partitions
  over them and every guarantee of one worker (files before commits,
  rebalances, kill -9) holds for each;
- restarts a worker that exits with anything but 0 (done: ``max_messages``
  or ``idle_timeout``, which count per worker run) or 2 (a configuration
  mistake, which a restart cannot mend: every worker is stopped and the
  supervisor exits 2), after a back-off that doubles from
  :data:`FIRST_BACKOFF_S` up to :data:`LONGEST_BACKOFF_S` while the worker
  keeps failing within :data:`HEALTHY_AFTER_S` of its start, as Kubernetes'
  ``CrashLoopBackOff`` does; :data:`CRASH_LOOP_LIMIT` such quick failures
  in a row (a model that cannot load, an output that cannot be written)
  stop every worker, and the supervisor exits with the last code;
- serves one ``/metrics``: every worker's series with a ``worker`` label
  (scraped from the workers in parallel at each scrape), plus
  ``nlpstream_worker_up`` and ``nlpstream_worker_restarts_total``;
- on SIGTERM or SIGINT sends SIGTERM to every worker (each finishes its
  batch, flushes, commits and exits 0), restarts none, and exits with the
  exit code of the lowest-numbered worker that did not exit 0, else 0. Workers are started with the
  kernel's parent-death signal set, so a supervisor killed with -9 takes
  its workers with it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlpstream.consumers.kafka_local import free_port  # a worker that loses its port to a race exits 1: restarted

log = logging.getLogger("nlpstream.supervisor")

FIRST_BACKOFF_S = 1.0
LONGEST_BACKOFF_S = 30.0
HEALTHY_AFTER_S = 60.0  # a worker that ran this long before failing restarts after the first back-off again
CRASH_LOOP_LIMIT = 5  # this many quick failures in a row of one worker stop every worker (exit: its code)
CONFIG_EXIT_CODE = 2  # the CLI's exit for a configuration mistake: a restart cannot mend it
SCRAPE_TIMEOUT_S = 3.0
WORKER_ENV = "NLPSTREAM_WORKER"  # the worker's index, in its environment (and its log lines)
SUPERVISOR_ENV = "NLPSTREAM_SUPERVISOR_PID"
WORKER_UP = "nlpstream_worker_up"  # the supervisor's own series (a gauge and a counter, label worker)
WORKER_RESTARTS = "nlpstream_worker_restarts"  # exposed as ..._total


def split_devices(devices: str, workers: int) -> list[str]:
    """Each worker's ``model.devices``: an explicit list (``cuda:0,cuda:1``) dealt out round robin.

    With at least as many devices as workers, worker ``i`` gets devices ``i, i + workers, ...``; with
    fewer, devices are shared (worker ``i`` gets device ``i mod n``). A single device or ``auto``,
    ``cpu``, ``cuda`` is given to every worker as it is.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    parts = [d.strip() for d in devices.split(",") if d.strip()]
    if len(parts) <= 1:
        return [devices] * workers
    return [",".join(parts[i::workers]) or parts[i % len(parts)] for i in range(workers)]


def expand_devices(devices: str, gpus: int) -> str:
    """``cuda`` or ``auto`` on a machine with ``gpus`` > 0 GPUs: the explicit list ``cuda:0,...`` (so that
    :func:`split_devices` gives each worker its own); anything else as it is."""
    if devices.strip() in ("cuda", "auto") and gpus > 0:
        return ",".join(f"cuda:{i}" for i in range(gpus))
    return devices


def gpu_count() -> int:
    """CUDA devices torch sees here (0 without torch's CUDA)."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install: the workers' own checks report it
        return 0


def set_parent_death_signal() -> None:
    """In a worker: have the kernel send SIGTERM when the supervisor dies (Linux; elsewhere nothing).

    Exits at once when the supervisor is already gone (it died before the signal was set).
    """
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not supervisor or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # no glibc (musl): the worker outlives a supervisor killed with -9
        return
    if os.getppid() != int(supervisor):
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class Worker:
    """One worker process and what the supervisor knows of it."""

    index: int
    command: Callable[[int], list[str]]  # the command line, given the worker's /metrics port
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    port: int | None = None
    started: float = 0.0
    restarts: int = 0
    quick_failures: int = 0  # failures in a row, each within HEALTHY_AFTER_S of its start
    backoff: float = FIRST_BACKOFF_S
    restart_at: float | None = None
    exit_code: int | None = None  # the final exit (no restart)
    serves_metrics: bool = True

    def start(self) -> None:
        self.port = free_port()
        # its own session: a terminal's Ctrl-C reaches the supervisor only, which stops the workers in order
        self.proc = subprocess.Popen(self.command(self.port), env=self.env, start_new_session=True)
        self.started = time.monotonic()
        self.restart_at = None
        log.info("worker %d started (pid %d%s)", self.index, self.proc.pid,
                 f", /metrics on 127.0.0.1:{self.port}" if self.serves_metrics else "")


@dataclass
class Supervisor:
    """Runs :class:`Worker` processes until each is done, restarting those that fail (see the module docstring)."""

    workers: list[Worker]
    poll_s: float = 0.2
    _stopping: bool = False  # a plain flag: a signal handler taking a lock could wait on the loop for ever
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def stop(self) -> None:
        """Ask every worker to finish (SIGTERM) and restart none; safe from a signal handler."""
        self._stopping = True

    def run(self) -> int:
        with self._lock:
            for worker in self.workers:
                worker.start()
        signalled = False
        fatal: int | None = None
        while True:
            now = time.monotonic()
            stopping = self._stopping or fatal is not None
            if stopping and not signalled:
                signalled = True
                self._signal_all(signal.SIGTERM)
            with self._lock:
                for worker in self.workers:
                    code = self._check(worker, now, stopping or fatal is not None)  # none restarts after a fatal
                    fatal = code if fatal is None else fatal
                if all(w.exit_code is not None for w in self.workers):
                    break
            time.sleep(self.poll_s)
        if fatal is not None:
            return fatal
        code = next((w.exit_code for w in self.workers if w.exit_code), 0) or 0  # the lowest-numbered worker's
        return code if code >= 0 else 128 - code  # killed by a signal: the shell's 128 + signal number

    def _check(self, worker: Worker, now: float, stopping: bool) -> int | None:
        """Collect an exit and start a due restart; returns the code that ends the whole run, if any."""
        if worker.exit_code is not None:
            return None
        if worker.proc is None or worker.restart_at is not None:  # waiting out a back-off
            if stopping:
                worker.exit_code, worker.restart_at = 0, None
            elif worker.restart_at is not None and now >= worker.restart_at:
                try:
                    worker.start()
                except OSError as exc:  # no process could be made (fork: EAGAIN, ENOMEM): a quick failure
                    log.warning("worker %d could not be started: %s", worker.index, exc)
                    worker.proc, worker.started = None, now
                    return self._failed(worker, now, 1)
            return None
        code = worker.proc.poll()
        if code is None:
            return None
        if stopping and code == -signal.SIGTERM:  # still starting when told to stop: its handler was not set yet
            code = 0
        if code == 0 or stopping:
            worker.exit_code = code
            log.info("worker %d exited with %d", worker.index, code)
            return None
        if code == CONFIG_EXIT_CODE:
            worker.exit_code = code
            log.error("worker %d exited with %d (a configuration mistake): stopping every worker", worker.index, code)
            return code
        return self._failed(worker, now, code)

    def _failed(self, worker: Worker, now: float, code: int) -> int | None:
        """Schedule a failed worker's restart after its back-off, or end the run after a crash loop."""
        ran = now - worker.started
        worker.quick_failures = 0 if ran >= HEALTHY_AFTER_S else worker.quick_failures + 1
        if worker.quick_failures >= CRASH_LOOP_LIMIT:  # a model that cannot load, an unusable output...
            worker.exit_code = code
            log.error("worker %d failed %d times in a row within %.0f s of its start (last exit %d): stopping every "
                      "worker", worker.index, worker.quick_failures, HEALTHY_AFTER_S, code)
            return code if code > 0 else 128 - code
        worker.backoff = FIRST_BACKOFF_S if ran >= HEALTHY_AFTER_S else worker.backoff
        worker.restarts += 1
        worker.restart_at = now + worker.backoff
        log.warning("worker %d exited with %d after %.1f s: restarting it in %.1f s (restart %d)",
                    worker.index, code, ran, worker.backoff, worker.restarts)
        worker.backoff = min(LONGEST_BACKOFF_S, worker.backoff * 2)
        return None

    def _signal_all(self, signum: int) -> None:
        with self._lock:
            for worker in self.workers:
                if worker.proc is not None and worker.proc.poll() is None:
                    worker.proc.send_signal(signum)

    def kill_all(self) -> None:
        """Kill every worker still running (the supervisor's own failure: leave no orphan behind)."""
        with self._lock:
            for worker in self.workers:
                if worker.proc is not None and worker.proc.poll() is None:
                    worker.proc.kill()
                    worker.proc.wait()

    def endpoints(self) -> list[Worker]:
        """The running workers, for a scrape."""
        with self._lock:
            return [w for w in self.workers if w.proc is not None and w.proc.poll() is None and w.port]


def scrape(port: int, timeout_s: float = SCRAPE_TIMEOUT_S) -> str:
    """A worker's ``/metrics`` in the OpenMetrics format (whose counters carry their ``_created`` samples, so
    the merged page is valid in both formats the supervisor serves)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - our own worker
        return response.read().decode("utf-8")


class WorkersCollector:
    """A prometheus-client collector: every worker's series with a ``worker`` label, and the workers' state."""

    def __init__(self, supervisor: Supervisor, fetch: Callable[[int], str] = scrape) -> None:
        self.supervisor = supervisor
        self.fetch = fetch
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(supervisor.workers)),
                                        thread_name_prefix="nlpstream-scrape")

    def _one(self, worker: Worker) -> tuple[Worker, list[Any] | None]:
        from prometheus_client.openmetrics.parser import text_string_to_metric_families

        try:
            return worker, list(text_string_to_metric_families(self.fetch(worker.port)))  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - starting, stopping, stuck or cut off mid-answer: nlpstream_worker_up 0
            return worker, None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

        families: dict[tuple[str, str], Metric] = {}
        answered: set[int] = set()
        for worker, parsed in self._pool.map(self._one, self.supervisor.endpoints()):
            if parsed is None:
                continue
            answered.add(worker.index)
            for family in parsed:
                merged = families.get((family.name, family.type))
                if merged is None:
                    merged = families[(family.name, family.type)] = Metric(family.name, family.documentation,
                                                                           family.type, family.unit)
                merged.samples.extend(s._replace(labels={**s.labels, "worker": str(worker.index)})
                                      for s in family.samples)
        yield from families.values()
        up = GaugeMetricFamily(WORKER_UP, "1 when the worker's /metrics answered this scrape.", labels=["worker"])
        restarts = CounterMetricFamily(WORKER_RESTARTS, "Restarts of the worker after it failed.", labels=["worker"])
        for worker in self.supervisor.workers:
            up.add_metric([str(worker.index)], 1.0 if worker.index in answered else 0.0)
            restarts.add_metric([str(worker.index)], float(worker.restarts))
        yield up
        yield restarts


def worker_command(config_file: Path | None, overrides: dict[str, Any], verbose: bool,
                   metrics: bool = True) -> Callable[[int], list[str]]:
    """The command line of a worker given its /metrics port: ``nlpstream stream-worker`` with the same settings
    (``metrics`` False: the supervisor serves no /metrics, so neither does the worker)."""

    def command(port: int) -> list[str]:
        # without metrics the worker reads metrics_port null from the same config (None overrides are ignored)
        mine = {**overrides, "metrics.metrics_port": port, "metrics.metrics_host": "127.0.0.1"} if metrics else overrides
        return [sys.executable, "-m", "nlpstream.jobs.cli", "stream-worker", "--overrides", json.dumps(mine),
                *(("--config", str(config_file)) if config_file is not None else ()), *(("-v",) if verbose else ())]

    return command


def worker_devices(devices: str, workers: int) -> list[str]:
    """Each worker's ``model.devices``: ``cuda``/``auto`` made explicit where GPUs are, then dealt out."""
    return split_devices(expand_devices(devices, gpu_count() if workers > 1 else 0), workers)


def supervise(cfg: Any, config_file: Path | None, overrides: dict[str, Any], devices: list[str], verbose: bool) -> int:
    """Run one stream worker of ``cfg`` (a loaded :class:`StreamConfig`) per entry of ``devices`` (each one's
    ``model.devices``: :func:`worker_devices`) until done; the exit code."""
    from prometheus_client import CollectorRegistry

    from nlpstream.jobs.metrics import start_metrics_server

    serve = cfg.metrics.metrics_port is not None
    supervisor = Supervisor([
        Worker(i, worker_command(config_file, {**overrides, "model.devices": mine}, verbose, metrics=serve),
               dict(os.environ, **{WORKER_ENV: str(i), SUPERVISOR_ENV: str(os.getpid())}), serves_metrics=serve)
        for i, mine in enumerate(devices)])
    server = None
    if serve:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkersCollector(supervisor))
        server = start_metrics_server(cfg.metrics.metrics_host, cfg.metrics.metrics_port, registry)
        log.info("serving the workers' /metrics on %s:%d", cfg.metrics.metrics_host, server.server_address[1])
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stop())
    signal.signal(signal.SIGINT, lambda *_: supervisor.stop())
    try:
        return supervisor.run()
    finally:
        supervisor.kill_all()
        if server is not None:
            server.shutdown()
            server.server_close()
