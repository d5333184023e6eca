"""The stream job against a real Kafka broker (never skipped)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from nlpstream.jobs.config import AlertConfig, InputConfig, KafkaConfig, MetricsConfig, ModelConfig, OutputConfig, StreamConfig
from nlpstream.jobs.stream import StreamJob
from tests.conftest import json_messages, produce, read_output, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.model]
LABELS = {"negative", "neutral", "positive"}


def config(bootstrap, topic, out, **kw):
    alerts = kw.pop("alerts", AlertConfig(message_min_score=None))
    return StreamConfig.model_construct(
        kafka=KafkaConfig(bootstrap_servers=bootstrap, topics=[topic], group_id=kw.pop("group", f"{topic}-g"),
                          dlq_topic=f"{topic}.dlq", client=kw.pop("client", "kafka-python")),
        input=InputConfig(), model=ModelConfig(devices="cpu"),
        output=OutputConfig(output=str(out), flush_interval=kw.pop("flush_interval", 1.0)),
        alerts=alerts, metrics=MetricsConfig(metrics_port=kw.pop("metrics_port", None)),
        max_messages=kw.pop("max_messages", None), idle_timeout=kw.pop("idle_timeout", 60.0),
    )


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_json_messages_land_exactly_once_with_metrics(kafka_bootstrap, make_topic, unique, tmp_path, engine, client):
    topic = make_topic(unique, partitions=3)
    n = 300
    produce(kafka_bootstrap, topic, json_messages(n, prefix=unique))
    job = StreamJob(config(kafka_bootstrap, topic, tmp_path, idle_timeout=4.0, metrics_port=0, client=client),
                    engine=engine)
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("summary", job.run()))
    runner.start()
    lag_keys = [f'nlpstream_consumer_lag{{partition="{p}",topic="{topic}"}}' for p in range(3)]
    lags = None
    deadline = time.monotonic() + 120
    while runner.is_alive() and time.monotonic() < deadline:
        if job.metrics_port is not None:
            live = scrape(job.metrics_port)
            if all(k in live for k in lag_keys) and live.get(f'nlpstream_messages_labeled_total{{topic="{topic}"}}') == n:
                lags = [live[k] for k in lag_keys]
                break
        time.sleep(0.2)
    runner.join(timeout=120)
    summary = result["summary"]
    assert lags == [0.0, 0.0, 0.0]
    assert summary.labeled == n and summary.dead_lettered == 0
    table = read_output(tmp_path)
    assert table.num_rows == n
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == n and all(i.startswith(unique) for i in ids)
    assert set(table.column("label").to_pylist()) <= LABELS
    assert set(table.column("topic").to_pylist()) == {topic}
    assert len(set(table.column("date").to_pylist())) >= 1
    assert sorted(set(table.column("partition").to_pylist())) == [0, 1, 2]
    assert set(table.column("model").to_pylist()) == {"builtin:sentiment"}
    metrics = scrape(job.metrics_port)
    assert metrics[f'nlpstream_messages_consumed_total{{topic="{topic}"}}'] == n
    assert metrics[f'nlpstream_messages_labeled_total{{topic="{topic}"}}'] == n
    assert metrics["nlpstream_batch_texts_count"] >= 1
    assert metrics["nlpstream_inference_seconds_count"] >= 1
    assert metrics["nlpstream_end_to_end_seconds_count"] >= n
    # committed offsets match the files
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=f"{topic}-g", enable_auto_commit=False)
    try:
        for p in range(3):
            offsets = [o for o, q in zip(table.column("offset").to_pylist(), table.column("partition").to_pylist()) if q == p]
            assert consumer.committed(TopicPartition(topic, p)) == max(offsets) + 1
    finally:
        consumer.close()


BAD = {
    "invalid_utf8": b"\xff\xfe\xfa not utf-8",
    "empty_value": b"",
    "malformed_json": b'{"text": "unterminated',
    "not_an_object": b'["text", "in", "a", "list"]',
    "missing_text": b'{"id": "no-text-here"}',
    "text_not_string": b'{"text": 12345}',
    "blank_text": b'{"text": "  \\t  "}',
}
NASTY = ["😀🔥 emoji only 🎉", "مرحبا، الخدمة كانت ممتازة", "NUL\u0000inside", "long " * 40000]


def test_bad_messages_go_to_dlq_with_headers_and_job_goes_on(kafka_bootstrap, make_topic, unique, tmp_path, engine):
    topic = make_topic(unique, partitions=1)
    make_topic(f"{unique}.dlq", partitions=1)
    messages = [(b"k-" + kind.encode(), value) for kind, value in BAD.items()]
    messages.append((b"null", None))
    nasty = [(None, json.dumps({"id": f"nasty-{i}", "text": t}).encode()) for i, t in enumerate(NASTY)]
    later = json_messages(20, prefix="after")
    produce(kafka_bootstrap, topic, messages + nasty + later, timestamp_ms=1_790_000_000_000)
    total = len(messages) + len(nasty) + len(later)
    summary = StreamJob(config(kafka_bootstrap, topic, tmp_path, max_messages=total), engine=engine).run()
    assert summary.dead_lettered == len(messages)
    assert summary.labeled == len(nasty) + len(later)
    ids = set(read_output(tmp_path).column("id").to_pylist())
    assert ids == {f"nasty-{i}" for i in range(len(NASTY))} | {f"after-{i}" for i in range(20)}
    dead = read_topic(kafka_bootstrap, f"{topic}.dlq", expected=len(messages))
    assert len(dead) == len(messages)
    by_offset = {}
    for r in dead:
        headers = dict(r.headers)
        for h in ("nlpstream.error.class", "nlpstream.error.message", "nlpstream.source.topic",
                  "nlpstream.source.partition", "nlpstream.source.offset"):
            assert h in headers, h
        assert headers["nlpstream.source.topic"] == topic.encode()
        assert headers["nlpstream.source.partition"] == b"0"
        assert r.timestamp == 1_790_000_000_000
        by_offset[int(headers["nlpstream.source.offset"])] = (r, headers)
    assert sorted(by_offset) == list(range(len(messages)))
    for offset, (kind, value) in enumerate(BAD.items()):
        r, headers = by_offset[offset]
        assert headers["nlpstream.error.class"] == f"DecodeError:{kind}".encode()
        assert r.key == b"k-" + kind.encode()
        assert (r.value or b"") == value
    r, headers = by_offset[len(BAD)]
    assert r.value is None and headers["nlpstream.error.class"] == b"DecodeError:empty_value"


def test_alert_burst_fires_once_and_replay_adds_no_new_id(kafka_bootstrap, make_topic, unique, tmp_path, engine):
    topic = make_topic(unique, partitions=2)
    make_topic(f"{unique}.alerts", partitions=1)
    negative = "This is unacceptable, my order is lost and nobody answers. Terrible service."
    msgs = []
    for i in range(30):
        customer, text = ("acme", negative) if i % 3 == 0 else ("other", "What are your opening hours on Sunday?")
        msgs.append((customer.encode(), json.dumps({"id": f"a{i}", "customer": customer, "text": text}).encode()))
    produce(kafka_bootstrap, topic, msgs, timestamp_ms=1_790_000_000_000)
    alert_file = tmp_path / "alerts.jsonl"
    from tests.sinks.test_webhook import Receiver

    hook = Receiver()
    rules = AlertConfig(alert_topic=f"{unique}.alerts", alert_file=str(alert_file), message_min_score=None,
                        window_key_field="customer", window_seconds=600, window_min_count=5, window_share=0.8,
                        alert_webhook_url=hook.url)
    try:
        first = StreamJob(config(kafka_bootstrap, topic, tmp_path / "o1", alerts=rules, max_messages=30), engine=engine).run()
    finally:
        hook.close()
    assert first.alerts == 1
    assert [body["key"] for _, body in hook.received] == ["acme"]
    rules = rules.model_copy(update={"alert_webhook_url": None})
    lines = [json.loads(x) for x in alert_file.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["key"] == "acme" and lines[0]["kind"] == "window"
    # replay the same input with a new group: same id, so nothing new in the file
    StreamJob(config(kafka_bootstrap, topic, tmp_path / "o2", alerts=rules, max_messages=30, group=f"{unique}-replay"),
              engine=engine).run()
    assert [json.loads(x)["id"] for x in alert_file.read_text().splitlines()] == [lines[0]["id"]]
    # a fresh alert file on replay gets the very same id
    fresh = tmp_path / "fresh.jsonl"
    rules2 = rules.model_copy(update={"alert_file": str(fresh), "alert_topic": None})
    StreamJob(config(kafka_bootstrap, topic, tmp_path / "o3", alerts=rules2, max_messages=30, group=f"{unique}-r2"),
              engine=engine).run()
    assert [json.loads(x)["id"] for x in fresh.read_text().splitlines()] == [lines[0]["id"]]
    on_topic = read_topic(kafka_bootstrap, f"{unique}.alerts", expected=1)
    assert len(on_topic) >= 1 and {r.key.decode() for r in on_topic} == {lines[0]["id"]}


def _stream_cmd(bootstrap, topic, out, group, extra=()):
    return [sys.executable, "-m", "nlpstream.jobs.cli", "stream", "--bootstrap-servers", bootstrap, "--topic", topic,
            "--group-id", group, "--output", str(out), "--devices", "cpu", "--flush-interval", "0.5",
            "--metrics-port", "0", *extra]


def test_sigterm_mid_stream_commits_what_is_durable_and_restart_continues(kafka_bootstrap, make_topic, unique, tmp_path):
    topic = make_topic(unique, partitions=3)
    n = 3000
    produce(kafka_bootstrap, topic, json_messages(n, prefix=unique))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_stream_cmd(kafka_bootstrap, topic, out, f"{unique}-g"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob("topic=*/date=*/part-*.parquet")):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    assert list(out.glob("topic=*/date=*/part-*.parquet")), "no file written within 120s"
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log
    first = read_output(out)
    assert 0 < first.num_rows < n, "SIGTERM should land mid-stream"
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=f"{unique}-g", enable_auto_commit=False)
    try:
        parts = first.column("partition").to_pylist()
        offs = first.column("offset").to_pylist()
        for p in range(3):
            mine = [o for o, q in zip(offs, parts) if q == p]
            committed = consumer.committed(TopicPartition(topic, p))
            assert committed == (max(mine) + 1 if mine else None)
    finally:
        consumer.close()
    again = subprocess.run(_stream_cmd(kafka_bootstrap, topic, out, f"{unique}-g", ["--idle-timeout", "5"]),
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    table = read_output(out)
    assert table.num_rows == n
    pairs = list(zip(table.column("partition").to_pylist(), table.column("offset").to_pylist()))
    assert len(set(pairs)) == n
    for p in range(3):
        offsets = sorted(o for q, o in pairs if q == p)
        assert offsets == list(range(len(offsets))), f"gap or repeat in partition {p}"
    assert len(set(table.column("id").to_pylist())) == n


def test_fetch_stall_rebuilds_the_consumer_and_output_stays_exact(kafka_bootstrap, make_topic, unique, tmp_path,
                                                                   engine, caplog):
    """A partition the client silently stops fetching (as a client bug would) is noticed and recovered."""
    from kafka import TopicPartition

    from nlpstream.jobs import metrics as job_metrics

    topic = make_topic(unique, partitions=3)
    first, n = 300, 900
    produce(kafka_bootstrap, topic, json_messages(first, prefix=unique))
    cfg = config(kafka_bootstrap, topic, tmp_path, max_messages=n, idle_timeout=120.0)
    cfg.kafka.fetch_stall_timeout = 4.0
    stalls_before = job_metrics.FETCH_STALLS._value.get()
    job = StreamJob(cfg, engine=engine)
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("summary", job.run()))
    runner.start()
    deadline = time.monotonic() + 120
    while job.summary.consumed < first and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.summary.consumed == first
    job._input._consumer.pause(TopicPartition(topic, 0))  # behind the job's back: the client no longer fetches it
    produce(kafka_bootstrap, topic, json_messages(n - first, prefix=f"{unique}-late"))
    runner.join(timeout=180)
    assert not runner.is_alive(), "the job did not recover from the stalled partition"
    assert "rebuilding the consumer" in caplog.text
    assert job_metrics.FETCH_STALLS._value.get() >= stalls_before + 1
    table = read_output(tmp_path)
    pairs = list(zip(table.column("partition").to_pylist(), table.column("offset").to_pylist()))
    assert len(pairs) == n and len(set(pairs)) == n
    assert result["summary"].labeled == n


def test_topics_written_with_every_kafka_codec_are_read(kafka_bootstrap, make_topic, unique, tmp_path, engine):
    topic = make_topic(unique, partitions=1)
    codecs = ("gzip", "lz4", "zstd", "snappy")
    for codec in codecs:
        produce(kafka_bootstrap, topic, json_messages(25, prefix=f"{unique}-{codec}"), compression_type=codec)
    summary = StreamJob(config(kafka_bootstrap, topic, tmp_path, max_messages=100), engine=engine).run()
    assert summary.labeled == 100 and summary.dead_lettered == 0
    ids = read_output(tmp_path).column("id").to_pylist()
    assert sorted(ids) == sorted(f"{unique}-{c}-{i}" for c in codecs for i in range(25))


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_resume_from_files_commits_the_resumed_positions_and_lag_is_true(kafka_bootstrap, make_topic, unique,
                                                                          tmp_path, engine, client):
    """A new group over an output that already holds everything: it commits where the files end, with no new traffic.

    Before, nothing was committed for partitions that got no new record, so
    the group's lag (what KEDA scales on) stayed up for good. Every counter
    with a known label exists at 0 from start-up.
    """
    from tests.jobs.faults import committed

    topic = make_topic(unique, partitions=3)
    n = 90
    produce(kafka_bootstrap, topic, json_messages(n, prefix=unique))
    first = StreamJob(config(kafka_bootstrap, topic, tmp_path, idle_timeout=3.0, group=f"{unique}-a", client=client),
                      engine=engine)
    assert first.run().labeled == n
    ends = committed(kafka_bootstrap, f"{unique}-a", topic, 3)
    assert sum(ends) == n

    job = StreamJob(config(kafka_bootstrap, topic, tmp_path, idle_timeout=30.0, group=f"{unique}-b", metrics_port=0,
                           client=client),
                    engine=engine)
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("summary", job.run()))
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while committed(kafka_bootstrap, f"{unique}-b", topic, 3) != ends and time.monotonic() < deadline:
            time.sleep(0.3)
        assert committed(kafka_bootstrap, f"{unique}-b", topic, 3) == ends  # without any new record
        lag_keys = [f'nlpstream_consumer_committed_lag{{partition="{p}",topic="{topic}"}}' for p in range(3)]
        while time.monotonic() < deadline:
            live = scrape(job.metrics_port)
            if all(k in live for k in lag_keys):
                break
            time.sleep(0.2)
        assert [live[k] for k in lag_keys] == [0.0, 0.0, 0.0]
        # counters with known labels exist at 0 before anything happens to them
        assert live[f'nlpstream_messages_labeled_total{{topic="{topic}"}}'] == n  # the first job's (one registry)
        assert live[f'nlpstream_messages_skipped_total{{topic="{topic}"}}'] == 0.0
        assert live[f'nlpstream_messages_dead_lettered_total{{reason="malformed_json",topic="{topic}"}}'] == 0.0
        assert live[f'nlpstream_messages_dead_lettered_total{{reason="inference",topic="{topic}"}}'] == 0.0
        assert live['nlpstream_messages_alerted_total{kind="window"}'] >= 0.0
        assert live['nlpstream_offset_commits_total{outcome="error"}'] >= 0.0
    finally:
        job.stop()
        runner.join(timeout=60)
    assert result["summary"].labeled == 0 and read_output(tmp_path).num_rows == n
    # a stuck sink is no longer invisible: a fresh record, the output folder immutable, committed lag shows it
    produce(kafka_bootstrap, topic, json_messages(3, prefix=f"{unique}-new"))
    out_files = sorted({p.parent for p in tmp_path.rglob("*.parquet")} | {tmp_path / f"topic={topic}"})
    job = StreamJob(config(kafka_bootstrap, topic, tmp_path, idle_timeout=30.0, group=f"{unique}-b", metrics_port=0,
                           client=client),
                    engine=engine)
    runner = threading.Thread(target=job.run)
    lag_keys = [f'nlpstream_consumer_committed_lag{{partition="{p}",topic="{topic}"}}' for p in range(3)]
    pos_keys = [f'nlpstream_consumer_lag{{partition="{p}",topic="{topic}"}}' for p in range(3)]
    subprocess.run(["chattr", "+i", *map(str, out_files)], check=True)
    try:
        runner.start()
        deadline = time.monotonic() + 60
        seen = None
        while time.monotonic() < deadline:
            if job.metrics_port is not None:
                live = scrape(job.metrics_port)
                if (all(k in live for k in lag_keys + pos_keys) and sum(live[k] for k in pos_keys) == 0
                        and sum(live[k] for k in lag_keys) == 3):
                    seen = live
                    break
            time.sleep(0.2)
        assert seen is not None, "committed lag did not show the 3 records the stuck sink holds"
        assert seen[f'nlpstream_messages_consumed_total{{topic="{topic}"}}'] == n + 3
        assert seen[f'nlpstream_messages_labeled_total{{topic="{topic}"}}'] == n  # none of the 3 (one registry)
    finally:
        subprocess.run(["chattr", "-i", *map(str, out_files)], check=True)
        job.stop()
        runner.join(timeout=90)
    assert read_output(tmp_path).num_rows == n + 3


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_transactional_topic_and_a_group_reset_to_zero_reach_committed_lag_zero(kafka_bootstrap, make_topic, unique,
                                                                                 tmp_path, engine, client):
    """A group whose committed offset is 0 shows its real committed lag while the sink is stuck; records written
    in a transaction end with a commit marker that holds no record, and the committed offset still reaches the end."""
    from confluent_kafka import Producer
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    from tests.jobs.faults import committed

    topic = make_topic(unique, partitions=1)
    group = f"{unique}-g"
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"{unique}-tx"})
    producer.init_transactions(30)
    producer.begin_transaction()
    n = 20
    for key, value in json_messages(n, prefix=unique):
        producer.produce(topic, value=value, key=key)
    producer.commit_transaction(30)
    reset = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    reset.commit({TopicPartition(topic, 0): OffsetAndMetadata(0, "", -1)})  # a group reset to the earliest offset
    reset.close()
    assert committed(kafka_bootstrap, group, topic, 1) == [0]
    stuck = tmp_path / f"topic={topic}"
    stuck.mkdir()
    subprocess.run(["chattr", "+i", str(stuck)], check=True)
    job = StreamJob(config(kafka_bootstrap, topic, tmp_path, idle_timeout=60.0, group=group, metrics_port=0,
                           client=client), engine=engine)
    runner = threading.Thread(target=job.run)
    key = f'nlpstream_consumer_committed_lag{{partition="0",topic="{topic}"}}'
    released = False
    try:
        runner.start()
        deadline = time.monotonic() + 60
        lag = None
        while time.monotonic() < deadline and lag != n + 1:
            if job.metrics_port is not None:
                lag = scrape(job.metrics_port).get(key)
            time.sleep(0.2)
        assert lag == n + 1  # 20 records and the transaction's commit marker, from committed offset 0
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
        released = True
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and committed(kafka_bootstrap, group, topic, 1) != [n + 1]:
            time.sleep(0.3)
        assert committed(kafka_bootstrap, group, topic, 1) == [n + 1]  # past the marker: nothing left to read
        while time.monotonic() < deadline and scrape(job.metrics_port).get(key) != 0.0:
            time.sleep(0.2)
        assert scrape(job.metrics_port)[key] == 0.0
    finally:
        if not released:
            subprocess.run(["chattr", "-i", str(stuck)], check=False)
        job.stop()
        runner.join(timeout=90)
    assert sorted(read_output(tmp_path).column("offset").to_pylist()) == list(range(n))
    # a new group over these files starts at the commit marker (where the files end): it is caught up, commits
    # past the marker and its idle timeout ends it
    again = StreamJob(config(kafka_bootstrap, topic, tmp_path, idle_timeout=10.0, group=f"{unique}-again",
                             client=client), engine=engine)
    done: dict = {}
    runner = threading.Thread(target=lambda: done.setdefault("summary", again.run()))
    runner.start()
    runner.join(timeout=90)
    if runner.is_alive():
        again.stop()
        runner.join(timeout=60)
    assert "summary" in done and done["summary"].labeled == 0, "the idle timeout did not end the caught-up job"
    assert committed(kafka_bootstrap, f"{unique}-again", topic, 1) == [n + 1]


def test_a_part_that_cannot_be_built_closes_the_parts_built_before_it(kafka_bootstrap, unique, tmp_path, engine,
                                                                     monkeypatch):
    """The alert topic's producer fails after the DLQ producer and the file alert sink exist: both are closed."""
    import kafka
    from kafka.errors import NoBrokersAvailable

    from nlpstream.consumers.errors import KafkaUnavailableError
    from nlpstream.jobs import wiring

    closed: list[str] = []

    class TrackedDLQ(wiring.DeadLetterQueue):
        def close(self) -> None:
            closed.append("dlq")
            super().close()

    class TrackedFileAlerts(wiring.FileAlertSink):
        def close(self) -> None:
            closed.append("alert file")
            super().close()

    def refused(**_: object) -> None:
        raise NoBrokersAvailable()

    monkeypatch.setattr(wiring, "DeadLetterQueue", TrackedDLQ)
    monkeypatch.setattr(wiring, "FileAlertSink", TrackedFileAlerts)
    monkeypatch.setattr(kafka, "KafkaProducer", refused)
    cfg = config(kafka_bootstrap, unique, tmp_path / "out",
                 alerts=AlertConfig(message_min_score=None, alert_topic=f"{unique}.alerts",
                                    alert_file=str(tmp_path / "alerts.jsonl")), metrics_port=0)
    job = StreamJob(cfg, engine=engine)
    with pytest.raises(KafkaUnavailableError, match="alert producer"):
        job.run()
    assert sorted(closed) == ["alert file", "dlq"]
    assert job.metrics_port  # /metrics was served before the wiring failed, and its port is free again
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", job.metrics_port)) != 0


def test_a_consumer_that_cannot_be_made_frees_the_metrics_port(kafka_bootstrap, unique, tmp_path, engine,
                                                              monkeypatch):
    """The job never reached its loop: /metrics is stopped, so the same port can serve a second run."""
    from nlpstream.jobs import stream

    def refused(*_: object, **__: object) -> None:
        raise RuntimeError("no consumer (simulated)")

    monkeypatch.setattr(stream, "KafkaInput", refused)
    job = StreamJob(config(kafka_bootstrap, unique, tmp_path / "out", metrics_port=0), engine=engine)
    with pytest.raises(RuntimeError, match="no consumer"):
        job.run()
    assert job.metrics_port
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", job.metrics_port)) != 0
