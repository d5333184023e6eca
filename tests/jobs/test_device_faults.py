"""Runner faults inside the real engine, through the stream job, against a real broker.

A transient fault changes nothing; a text that makes the model fail is the
only dead letter; a device that is gone stops the job with DeviceError,
nothing dead-lettered and nothing committed past the durable files, and a
restart finishes the topic exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from nlpstream.inference import DeviceError
from nlpstream.inference.engine import Engine
from nlpstream.jobs.config import AlertConfig, InputConfig, KafkaConfig, MetricsConfig, ModelConfig, OutputConfig, StreamConfig
from nlpstream.jobs.stream import DEVICE_EXIT_CODE, StreamJob
from tests.conftest import json_messages, produce, read_output, read_topic
from tests.jobs.faults import exactness
from tests.jobs.test_faults import committed

pytestmark = [pytest.mark.kafka, pytest.mark.model]


class ScriptedRunner:
    """The real runner, with faults: raise on chosen calls, on a token, or for good after N calls."""

    def __init__(self, inner, fail_calls=(), dead_after=None, poison_token=None):
        self.inner = inner
        self.name, self.concurrency = inner.name, inner.concurrency
        self.fail_calls, self.dead_after, self.poison_token = set(fail_calls), dead_after, poison_token
        self.calls = self.injected = 0
        self._lock = threading.Lock()

    def __call__(self, input_ids, mask):
        with self._lock:
            self.calls += 1
            n = self.calls
        if self.dead_after is not None and n > self.dead_after:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        if n in self.fail_calls:
            self.injected += 1
            raise RuntimeError("transient runner fault (simulated)")
        if self.poison_token is not None and bool((input_ids == self.poison_token).any()):
            raise RuntimeError("the model raised on this input (simulated)")
        return self.inner(input_ids, mask)


def scripted_engine(engine, **faults) -> tuple[Engine, ScriptedRunner]:
    eng = Engine(engine.bundle, ["cpu"], "fp32", cache_entries=0)
    runner = ScriptedRunner(eng._replicas[0].runner, **faults)
    eng._replicas[0].runner = runner
    return eng, runner


def config(bootstrap, topic, out, **kw):
    return StreamConfig.model_construct(
        kafka=KafkaConfig(bootstrap_servers=bootstrap, topics=[topic], group_id=f"{topic}-g", dlq_topic=f"{topic}.dlq",
                          max_poll_records=kw.pop("max_poll_records", 512)),
        input=InputConfig(), model=ModelConfig(devices="cpu"),
        output=OutputConfig(output=str(out), flush_interval=kw.pop("flush_interval", 0.5)),
        alerts=AlertConfig(message_min_score=None), metrics=MetricsConfig(metrics_port=None),
        max_messages=kw.pop("max_messages", None), idle_timeout=kw.pop("idle_timeout", 30.0))


def test_one_transient_runner_fault_changes_nothing(kafka_bootstrap, make_topic, unique, tmp_path, engine):
    topic = make_topic(unique, partitions=2)
    make_topic(f"{unique}.dlq", partitions=1)
    n = 200
    produce(kafka_bootstrap, topic, json_messages(n, prefix=unique))
    eng, runner = scripted_engine(engine, fail_calls={3})
    with eng:
        summary = StreamJob(config(kafka_bootstrap, topic, tmp_path, max_messages=n), engine=eng).run()
    assert runner.injected == 1, "the fault must have fired"
    assert summary.labeled == n and summary.dead_lettered == 0
    assert exactness(tmp_path, 2, n) == {"rows": n, "lost": 0, "duplicated": 0, "gaps": 0, "partitions_seen": 2}
    assert read_topic(kafka_bootstrap, f"{topic}.dlq", expected=0, timeout_s=3) == []
    expected = {f"{unique}-{i}": p.label for i, p in enumerate(engine.classify([json.loads(v)["text"]
                                                                                 for _, v in json_messages(n, unique)]))}
    table = read_output(tmp_path)
    assert dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist())) == expected


def test_a_text_the_model_fails_on_is_the_only_dead_letter(kafka_bootstrap, make_topic, unique, tmp_path, engine):
    topic = make_topic(unique, partitions=1)
    make_topic(f"{unique}.dlq", partitions=1)
    poison_token = engine.tokenize(["xylophone"])[0][1]
    messages = json_messages(60, prefix=unique)
    messages[17] = (b"bad", json.dumps({"id": "bad", "text": "the xylophone broke the model"}).encode())
    produce(kafka_bootstrap, topic, messages)
    eng, _ = scripted_engine(engine, poison_token=poison_token)
    with eng:
        summary = StreamJob(config(kafka_bootstrap, topic, tmp_path, max_messages=60), engine=eng).run()
    assert summary.labeled == 59 and summary.dead_lettered == 1
    assert all(r.alive for r in eng._replicas)
    dead = read_topic(kafka_bootstrap, f"{topic}.dlq", expected=1)
    assert [r.key for r in dead] == [b"bad"]
    headers = dict(dead[0].headers)
    assert headers["nlpstream.source.offset"] == b"17" and b"raised on this input" in headers["nlpstream.error.message"]
    assert "bad" not in set(read_output(tmp_path).column("id").to_pylist())


def test_a_gone_device_stops_the_job_without_dead_letters_and_a_restart_finishes(
        kafka_bootstrap, make_topic, unique, tmp_path, engine):
    topic, parts, n = make_topic(unique, partitions=3), 3, 400
    make_topic(f"{unique}.dlq", partitions=1)
    produce(kafka_bootstrap, topic, json_messages(n, prefix=unique))
    eng, runner = scripted_engine(engine, dead_after=6)
    cfg = config(kafka_bootstrap, topic, tmp_path, max_poll_records=40, flush_interval=0.01)
    with eng, pytest.raises(DeviceError, match="no device replica is live"):
        StreamJob(cfg, engine=eng).run()
    assert runner.calls > 6
    assert read_topic(kafka_bootstrap, f"{topic}.dlq", expected=0, timeout_s=3) == []
    table = read_output(tmp_path)
    durable: dict[int, int] = {}
    for p, o in zip(table.column("partition").to_pylist(), table.column("offset").to_pylist()):
        durable[p] = max(durable.get(p, -1), o)
    assert 0 < table.num_rows < n, "some batches were durable before the device went"
    offsets = committed(kafka_bootstrap, f"{topic}-g", topic, parts)
    for p in range(parts):  # committed only what the files hold, never past them
        assert offsets[p] is None or offsets[p] <= durable.get(p, -1) + 1
    summary = StreamJob(config(kafka_bootstrap, topic, tmp_path, idle_timeout=5.0), engine=engine).run()
    assert summary.dead_lettered == 0
    assert exactness(tmp_path, parts, n) == {"rows": n, "lost": 0, "duplicated": 0, "gaps": 0, "partitions_seen": parts}


def test_cli_start_up_device_errors_exit_1_and_lost_devices_exit_69(monkeypatch):
    proc = subprocess.run([sys.executable, "-m", "nlpstream.jobs.cli", "stream", "--topic", "t", "--bootstrap-servers",
                           "127.0.0.1:9", "--devices", "cuda:7"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]  # a wrong device spec: a restart would not help
    assert "cuda:7" in proc.stderr
    from typer.testing import CliRunner

    from nlpstream.inference import NoLiveDeviceError
    from nlpstream.jobs import cli

    def lost(self):
        raise NoLiveDeviceError("no device replica is live (cuda:0#0 down)")

    monkeypatch.setattr(StreamJob, "run", lost)
    result = CliRunner().invoke(cli.app, ["stream", "--topic", "t", "--bootstrap-servers", "127.0.0.1:9"])
    assert result.exit_code == DEVICE_EXIT_CODE and "no device replica is live" in result.output
