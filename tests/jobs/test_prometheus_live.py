"""A real Prometheus server (Debian's package) scrapes a real stream job and evaluates the shipped rules.

One job, one Prometheus, two phases: first the output cannot be written
(its topic folder is immutable), and the no-progress alert must go pending
while the committed lag shows the waiting records; then the folder is
released, every record lands, and every Grafana panel's query returns data.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import json_messages, produce, read_output

pytestmark = [pytest.mark.kafka, pytest.mark.model]
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _query(prom: str, expr: str) -> list[dict]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _value(prom: str, expr: str) -> float | None:
    result = _query(prom, expr)
    return float(result[0]["value"][1]) if result else None


def _wait(predicate, timeout_s: float, what: str, *procs: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, f"{what}: a process exited early ({proc.args[:3]})"
        try:
            if predicate():
                return
        except (OSError, ValueError):  # not answering yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    assert found, "the prometheus server is missing: install Debian's 'prometheus' package (.ci/run does)"
    return found


def test_prometheus_sees_a_stuck_sink_as_no_progress_then_every_panel_has_data(
        prometheus_binary, kafka_bootstrap, make_topic, unique, tmp_path):
    topic = make_topic(unique, partitions=3)
    n, bad = 240, 6
    produce(kafka_bootstrap, topic, json_messages(n, prefix=unique) + [(None, b"{not json")] * bad)
    out = tmp_path / "out"
    stuck = out / f"topic={topic}"
    stuck.mkdir(parents=True)
    subprocess.run(["chattr", "+i", str(stuck)], check=True)  # root can't write there either
    metrics_port, prom_port = _free_port(), _free_port()
    log = tmp_path / "job.log"
    job = subprocess.Popen(
        [sys.executable, "-m", "nlpstream.jobs.cli", "stream", "--bootstrap-servers", kafka_bootstrap,
         "--topic", topic, "--group-id", f"{unique}-g", "--output", str(out), "--devices", "cpu",
         "--flush-interval", "0.5", "--metrics-port", str(metrics_port)],
        stdout=subprocess.DEVNULL, stderr=log.open("w"), env=dict(os.environ, PYTHONUNBUFFERED="1"))
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "rules.yml")],
        "scrape_configs": [{"job_name": "nlpstream", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }))
    prom_log = tmp_path / "prometheus.log"
    prom = subprocess.Popen(
        [prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=subprocess.DEVNULL, stderr=prom_log.open("w"))
    url = f"http://127.0.0.1:{prom_port}"
    released = False
    try:
        _wait(lambda: _value(url, 'up{job="nlpstream"}') == 1.0, 120, "Prometheus scraping the job", job, prom)
        # phase 1: every record fetched, none durable
        committed_lag = f'sum(nlpstream_consumer_committed_lag{{topic="{topic}"}})'
        _wait(lambda: _value(url, committed_lag) == n + bad, 180, "committed lag of all records", job, prom)
        # the sink really failed (committed lag counts from the start offset before the first flush is tried)
        _wait(lambda: (_value(url, "nlpstream_sink_retries_total") or 0) > 0, 120, "a failed flush", job, prom)
        pending = f'ALERTS{{alertname="NlpstreamNoProgress",alertstate="pending",topic="{topic}"}}'
        _wait(lambda: bool(_query(url, pending)), 60, "NlpstreamNoProgress pending", job, prom)
        _wait(lambda: _value(url, f'sum(nlpstream_consumer_lag{{topic="{topic}"}})') == 0.0, 30,
              "position lag 0 (it hides the stuck records)", job, prom)
        assert _value(url, f'nlpstream_messages_labeled_total{{topic="{topic}"}}') == 0.0  # exists at 0
        assert _value(url, 'nlpstream_messages_alerted_total{kind="message"}') is not None
        # phase 2: the sink recovers; the first batch shows in increase() because the series existed at 0
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
        released = True
        _wait(lambda: _value(url, committed_lag) == 0.0, 180, "committed lag back to 0", job, prom)
        _wait(lambda: _value(url, f'nlpstream_messages_labeled_total{{topic="{topic}"}}') == n, 60, "labeled", job)
        _wait(lambda: not _query(url, f'ALERTS{{alertname="NlpstreamNoProgress",topic="{topic}"}}'), 30,
              "NlpstreamNoProgress resolved", job, prom)
        assert _value(url, f'increase(nlpstream_messages_labeled_total{{topic="{topic}"}}[5m])') >= n * 0.9
        assert _value(url, f'sum(nlpstream_messages_dead_lettered_total{{topic="{topic}"}})') == bad
        time.sleep(3)  # a few more scrapes for rate() windows
        dashboard = json.loads((DEPLOY / "grafana" / "nlpstream-dashboard.json").read_text())
        empty = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]
                 if not _query(url, target["expr"])]
        assert not empty, f"dashboard panels without data after a healthy run: {empty}"
    finally:
        if not released:
            subprocess.run(["chattr", "-i", str(stuck)], check=False)
        job.send_signal(signal.SIGTERM)
        try:
            job.wait(timeout=90)
        except subprocess.TimeoutExpired:
            job.kill()
        prom.terminate()
        prom.wait(timeout=30)
    text = log.read_text()
    assert job.returncode == 0, text[-3000:]
    # quiet logs: the DLQ topic created on first use is no ERROR, the outage is one WARNING
    assert " ERROR " not in text and "WARNING kafka" not in text, text[-3000:]
    assert text.count("flush failed, retrying with backoff") == 1, text[-3000:]
    assert read_output(out).num_rows == n
