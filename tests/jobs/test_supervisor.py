"""``nlpstream stream --workers N``: the supervisor's parts on real processes and HTTP endpoints, then the
real CLI with two workers on the local broker (kill -9 of a worker, exactly-once output, one /metrics)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from nlpstream.consumers.kafka_local import free_port
from nlpstream.jobs import supervisor as sup
from nlpstream.jobs.supervisor import Supervisor, Worker, WorkersCollector, split_devices
from tests.conftest import json_messages, produce
from tests.jobs.faults import exactness, rows_in, wait_for


def test_split_devices_deals_an_explicit_list_out_round_robin() -> None:
    assert split_devices("cuda:0,cuda:1,cuda:2,cuda:3", 2) == ["cuda:0,cuda:2", "cuda:1,cuda:3"]
    assert split_devices("cuda:0,cuda:1", 2) == ["cuda:0", "cuda:1"]
    assert split_devices("cuda:0, cuda:1", 3) == ["cuda:0", "cuda:1", "cuda:0"]  # more workers: shared
    assert split_devices("cuda", 2) == ["cuda", "cuda"]
    assert split_devices("cpu:2", 3) == ["cpu:2"] * 3
    assert split_devices("auto", 1) == ["auto"]
    with pytest.raises(ValueError):
        split_devices("cpu", 0)


def test_cuda_and_auto_on_a_machine_with_gpus_mean_every_gpu() -> None:
    from nlpstream.jobs.supervisor import expand_devices

    assert expand_devices("cuda", 4) == "cuda:0,cuda:1,cuda:2,cuda:3"
    assert split_devices(expand_devices("auto", 2), 2) == ["cuda:0", "cuda:1"]
    assert expand_devices("auto", 0) == "auto" and expand_devices("cuda", 0) == "cuda"  # no GPU here
    assert expand_devices("cuda:1", 4) == "cuda:1" and expand_devices("cpu", 4) == "cpu"


def test_a_taken_metrics_port_is_one_error_line_and_starts_no_worker(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run(
            [sys.executable, "-m", "nlpstream.jobs.cli", "stream", "--bootstrap-servers", "127.0.0.1:1",
             "--topic", "t", "--output", str(tmp_path / "out"), "--devices", "cpu", "--workers", "2",
             "--metrics-port", str(taken.getsockname()[1])],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot serve /metrics on 127.0.0.1:")
    assert "worker 0 started" not in proc.stderr and "Traceback" not in proc.stderr


def _python(code: str) -> Any:
    """A worker command running ``code`` (its /metrics port is ignored)."""
    return lambda port: [sys.executable, "-c", textwrap.dedent(code)]


_SLEEPER = """
    import signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    time.sleep(120)
"""


def test_a_failed_worker_is_restarted_and_a_finished_one_is_not(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(sup, "FIRST_BACKOFF_S", 0.2)
    marker = tmp_path / "ran"
    flaky = _python(f"""
        import pathlib, sys
        p = pathlib.Path({str(marker)!r})
        runs = int(p.read_text()) if p.exists() else 0
        p.write_text(str(runs + 1))
        sys.exit(0 if runs >= 2 else 3)  # fails twice, then finishes
    """)
    done = _python("import sys; sys.exit(0)")
    workers = [Worker(0, flaky, dict(os.environ), backoff=0.2), Worker(1, done, dict(os.environ))]
    assert Supervisor(workers, poll_s=0.05).run() == 0
    assert marker.read_text() == "3"
    assert [w.restarts for w in workers] == [2, 0]
    assert [w.exit_code for w in workers] == [0, 0]
    assert workers[0].backoff == 0.8  # doubled at each quick failure


def test_a_worker_failing_again_and_again_at_start_up_stops_every_worker(monkeypatch: Any) -> None:
    monkeypatch.setattr(sup, "LONGEST_BACKOFF_S", 0.1)
    workers = [Worker(0, _python("import sys; sys.exit(1)"), dict(os.environ), backoff=0.05),
               Worker(1, _python(_SLEEPER), dict(os.environ))]
    start = time.monotonic()
    assert Supervisor(workers, poll_s=0.05).run() == 1
    assert time.monotonic() - start < 60
    assert workers[0].restarts == sup.CRASH_LOOP_LIMIT - 1 and workers[0].quick_failures == sup.CRASH_LOOP_LIMIT
    assert workers[1].exit_code == 0


def test_a_restart_that_cannot_make_a_process_counts_as_a_quick_failure(monkeypatch: Any) -> None:
    monkeypatch.setattr(sup, "LONGEST_BACKOFF_S", 0.1)
    calls: list[int] = []

    def command(port: int) -> list[str]:  # runs once and fails, then no process can be made
        calls.append(port)
        return [sys.executable, "-c", "import sys; sys.exit(1)"] if len(calls) == 1 else ["/nonexistent/worker"]

    worker = Worker(0, command, dict(os.environ), backoff=0.05)
    assert Supervisor([worker], poll_s=0.05).run() == 1  # no traceback: the crash-loop limit ends it
    assert len(calls) == sup.CRASH_LOOP_LIMIT and worker.quick_failures == sup.CRASH_LOOP_LIMIT


def test_a_configuration_exit_stops_every_worker_and_is_the_supervisors_exit(tmp_path: Path) -> None:
    workers = [Worker(0, _python("import sys, time; time.sleep(0.5); sys.exit(2)"), dict(os.environ)),
               Worker(1, _python(_SLEEPER), dict(os.environ))]
    start = time.monotonic()
    assert Supervisor(workers, poll_s=0.05).run() == 2
    assert time.monotonic() - start < 60  # the sleeper was stopped, not waited out
    assert workers[1].exit_code == 0 and workers[1].restarts == 0


def test_stop_sends_sigterm_to_every_worker_and_restarts_none() -> None:
    workers = [Worker(i, _python(_SLEEPER), dict(os.environ)) for i in range(2)]
    supervisor = Supervisor(workers, poll_s=0.05)
    import threading

    timer = threading.Timer(1.0, supervisor.stop)
    timer.start()
    start = time.monotonic()
    assert supervisor.run() == 0
    assert time.monotonic() - start < 60
    assert [w.exit_code for w in workers] == [0, 0] and [w.restarts for w in workers] == [0, 0]


def test_a_worker_killed_by_a_signal_while_stopping_gives_the_shells_exit_code() -> None:
    stubborn = _python("""
        import os, signal, time
        signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGKILL))
        time.sleep(120)
    """)
    supervisor = Supervisor([Worker(0, stubborn, dict(os.environ))], poll_s=0.05)
    import threading

    threading.Timer(1.0, supervisor.stop).start()
    assert supervisor.run() == 128 + signal.SIGKILL


def test_workers_die_with_a_supervisor_killed_with_minus_9(tmp_path: Path) -> None:
    script = tmp_path / "supervise.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from nlpstream.jobs.supervisor import SUPERVISOR_ENV, Supervisor, Worker
        code = "from nlpstream.jobs.supervisor import set_parent_death_signal as s; s(); import time; time.sleep(120)"
        env = dict(os.environ, **{{SUPERVISOR_ENV: str(os.getpid())}})
        workers = [Worker(i, lambda port: [sys.executable, "-c", code], env) for i in range(2)]
        s = Supervisor(workers)
        import threading
        threading.Timer(1.0, lambda: print(*(w.proc.pid for w in workers), flush=True)).start()
        s.run()
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]  # type: ignore[union-attr]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        proc.kill()
        proc.wait(timeout=10)
        wait_for(lambda: not any(_alive(p) for p in pids), 20, "the workers to exit with their supervisor")
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited (its parent, the killed supervisor, cannot reap it)


def test_one_metrics_page_serves_every_workers_series_with_a_worker_label() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
    from prometheus_client.openmetrics import exposition as om
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
    from prometheus_client.parser import text_string_to_metric_families

    servers, workers = [], []
    for i in range(2):
        registry = CollectorRegistry()
        Counter("demo_messages_total", "Messages.", ["topic"], registry=registry).labels("a").inc(10 + i)
        Gauge("demo_lag", "Lag.", registry=registry).set(5 * i)
        Histogram("demo_seconds", "Time.", registry=registry, buckets=(0.1, 1.0)).observe(0.5)
        server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
        servers.append(server)
        worker = Worker(i, _python(_SLEEPER), dict(os.environ))
        worker.start()
        worker.port = server.server_address[1]  # its metrics: the registry above
        workers.append(worker)
    dead = Worker(2, _python(_SLEEPER), dict(os.environ))
    dead.start()  # answers nothing on its port
    garbled = Worker(3, _python(_SLEEPER), dict(os.environ))
    garbled.start()  # answers with a page cut off mid-line
    workers += [dead, garbled]
    supervisor = Supervisor(workers)
    workers[1].restarts = 3

    def fetch(port: int) -> str:
        return 'demo_messages_total{topic="a' if port == garbled.port else sup.scrape(port)

    try:
        merged = CollectorRegistry(auto_describe=False)
        merged.register(WorkersCollector(supervisor, fetch=fetch))
        text = generate_latest(merged).decode()
        openmetrics = om.generate_latest(merged).decode()  # what Prometheus asks for first
    finally:
        supervisor.kill_all()
        for server in servers:
            server.shutdown()
            server.server_close()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("demo_messages_total", (("topic", "a"), ("worker", "0")))] == 10
    assert samples[("demo_messages_total", (("topic", "a"), ("worker", "1")))] == 11
    assert samples[("demo_lag", (("worker", "1"),))] == 5
    assert samples[("nlpstream_worker_up", (("worker", "0"),))] == 1
    assert samples[("nlpstream_worker_up", (("worker", "2"),))] == 0
    assert samples[("nlpstream_worker_up", (("worker", "3"),))] == 0  # one bad page spoils only its worker's series
    assert not any(dict(labels).get("worker") == "3" for name, labels in samples if name.startswith("demo"))
    assert samples[("demo_seconds_bucket", (("le", "1.0"), ("worker", "1")))] == 1
    assert samples[("nlpstream_worker_restarts_total", (("worker", "1"),))] == 3
    assert text.count("# TYPE demo_messages_total counter") == 1  # one family, both workers' samples
    from tests.test_deploy import promtool_check_metrics

    promtool_check_metrics(text)
    om_samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for family in om_families(openmetrics) for s in family.samples}  # the strict parser accepts it
    assert om_samples[("demo_messages_total", (("topic", "a"), ("worker", "1")))] == 11
    assert ("demo_messages_created", (("topic", "a"), ("worker", "0"))) in om_samples


def test_two_workers_under_one_supervisor_label_every_message_once_through_a_kill_9(
        kafka_bootstrap: str, make_topic: Any, unique: str, tmp_path: Path) -> None:
    topic = make_topic(unique, partitions=4)
    out, log = tmp_path / "out", tmp_path / "supervisor.log"
    first = json_messages(400, prefix="a")
    produce(kafka_bootstrap, topic, first)
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", NLPSTREAM_KAFKA__SESSION_TIMEOUT_MS="6000")
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nlpstream.jobs.cli", "stream", "--bootstrap-servers", kafka_bootstrap,
             "--topic", topic, "--group-id", unique, "--output", str(out), "--devices", "cpu",
             "--flush-interval", "0.3", "--metrics-port", str(port), "--workers", "2"],
            env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: rows_in(out) >= 400, 240, "the first 400 rows", proc)
        pids = _worker_pids(log)
        assert set(pids) == {0, 1}
        consumed = _scrape(port, "nlpstream_messages_consumed_total")
        assert set(consumed) == {"0", "1"}, consumed  # both workers took partitions
        assert sum(consumed.values()) >= 400

        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: len(re.findall(r"worker 0 started", log.read_text())) == 2, 60,
                 "worker 0 to be restarted", proc)
        produce(kafka_bootstrap, topic, json_messages(200, prefix="b"))
        wait_for(lambda: rows_in(out) >= 600, 240, "all 600 rows", proc)
        assert _scrape(port, "nlpstream_worker_restarts_total") == {"0": 1.0, "1": 0.0}
        # the restarted worker answers once it has started up again (the other may have done all the work)
        wait_for(lambda: _scrape(port, "nlpstream_worker_up") == {"0": 1.0, "1": 1.0}, 60,
                 "both workers' /metrics to answer", proc)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
        live = _worker_pids(log)
        assert not any(_alive(p) for p in live.values())
        assert exactness(out, 4, 600) == {"rows": 600, "lost": 0, "duplicated": 0, "gaps": 0, "partitions_seen": 4}
        text = log.read_text()
        assert "worker 0 exited with -9" in text and "worker 1 " in text  # the workers' own lines say who they are
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _worker_pids(log: Path) -> dict[int, int]:
    """Worker index -> pid of its latest start, from the supervisor's log."""
    return {int(i): int(p) for i, p in re.findall(r"worker (\d+) started \(pid (\d+)", log.read_text())}


def _scrape(port: int, name: str) -> dict[str, float]:
    """Per worker, the sum of ``name``'s samples on the supervisor's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(sup.scrape(port)):
        for s in family.samples:
            if s.name == name:
                totals[s.labels["worker"]] = totals.get(s.labels["worker"], 0.0) + s.value
    return totals
