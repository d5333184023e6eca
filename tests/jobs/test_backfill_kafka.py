"""Kafka replay backfill on a real broker: exactly the records of a time range, bad ones dead-lettered as the
stream job does, no consumer group, resume, and the CLI's errors."""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys

import pytest

from nlpstream.consumers.dlq import HEADER_CLASS, HEADER_MESSAGE, HEADER_OFFSET, HEADER_PARTITION, HEADER_TOPIC
from nlpstream.jobs.backfill import BackfillError
from nlpstream.jobs.backfill_kafka import KafkaBackfill
from nlpstream.jobs.config import BackfillConfig, load_config
from nlpstream.jobs.gc_tuning import YOUNG_THRESHOLD
from tests.conftest import produce, read_output, read_topic
from tests.inference.fakes import fake_engine

pytestmark = pytest.mark.kafka
T0 = 1_700_000_000_000  # ms; the range under test is [T0 + 100 s, T0 + 200 s)
FROM, TO = "2023-11-14T22:15:00Z", "2023-11-14T22:16:40Z"


def _cfg(bootstrap: str, topic: str, out: str, **extra: object) -> BackfillConfig:
    return load_config(BackfillConfig, None, {"output.output": out, "kafka.bootstrap_servers": bootstrap,
                                              "kafka.topics": [topic], **extra})


def _fill(bootstrap: str, topic: str) -> dict[str, int]:
    """Per partition: 5 records before, 8 inside (2 bad), 5 after the range; returns inside ids -> partition."""
    from kafka import KafkaProducer

    inside: dict[str, int] = {}
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for partition in (0, 1):
        sends: list[tuple[bytes | None, bytes, int]] = []
        for i in range(5):
            sends.append((None, json.dumps({"id": f"old-{partition}-{i}", "text": "old"}).encode(), T0 + i * 1000))
        for i in range(8):
            if i == 3:
                value = b"{not json"
            elif i == 5:
                value = json.dumps({"id": f"blank-{partition}", "text": "  "}).encode()
            else:
                value = json.dumps({"id": f"in-{partition}-{i}", "text": f"inside {i} on {partition}"}).encode()
                inside[f"in-{partition}-{i}"] = partition
            sends.append((f"k{i}".encode(), value, T0 + 100_000 + i * 10_000))
        for i in range(5):
            sends.append((None, json.dumps({"id": f"new-{partition}-{i}", "text": "new"}).encode(),
                          T0 + 200_000 + i * 1000))
        for key, value, ms in sends:
            producer.send(topic, key=key, value=value, partition=partition, timestamp_ms=ms).get(timeout=30)
    producer.close()
    return inside


def test_replay_labels_exactly_the_time_range_dead_letters_bad_records_and_joins_no_group(
        kafka_bootstrap, make_topic, unique, tmp_path):
    from kafka import KafkaAdminClient

    topic = make_topic(f"{unique}-src", partitions=2)
    inside = _fill(kafka_bootstrap, topic)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    groups_before = {g[0] for g in admin.list_consumer_groups()}
    out = str(tmp_path / "out")
    cfg = _cfg(kafka_bootstrap, topic, out, rows_per_file=3)
    engine, _ = fake_engine(["cpu"], precision="fp32")
    collector = []  # (young threshold, anything frozen) at each engine call: the job's gc_tuning, on by default
    classify_each = engine.classify_each
    engine.classify_each = lambda texts: collector.append((gc.get_threshold()[0], gc.get_freeze_count() > 0)) or \
        classify_each(texts)
    with engine:
        job = KafkaBackfill(cfg, topic, T0 + 100_000, T0 + 200_000)
        assert job.plan() == 16
        summary = job.run(engine)
        assert collector and set(collector) == {(YOUNG_THRESHOLD, True)}
        # a rerun finds every piece finished
        again = KafkaBackfill(cfg, topic, T0 + 100_000, T0 + 200_000)
        assert again.plan() == 0
        assert again.run(engine).rows == 0 and again.already_done == 16
    assert summary.rows == 12 and summary.dead_lettered == 4
    table = read_output(out)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert set(rows) == set(inside) and table.num_rows == 12
    for rid, partition in inside.items():
        i = int(rid.rsplit("-", 1)[1])
        assert (rows[rid]["topic"], rows[rid]["partition"], rows[rid]["offset"]) == (topic, partition, 5 + i)
        assert rows[rid]["event_time"].timestamp() * 1000 == T0 + 100_000 + i * 10_000
    dead = read_topic(kafka_bootstrap, f"{topic}.dlq", expected=4)
    assert len(dead) == 4
    headers = [dict(r.headers) for r in dead]
    assert sorted(h[HEADER_CLASS] for h in headers) == [b"DecodeError:blank_text"] * 2 + [b"DecodeError:malformed_json"] * 2
    assert {(h[HEADER_TOPIC], h[HEADER_PARTITION], h[HEADER_OFFSET]) for h in headers} == {
        (topic.encode(), str(p).encode(), str(o).encode()) for p in (0, 1) for o in (8, 10)}
    assert {r.value for r in dead} >= {b"{not json"}
    groups_after = {g[0] for g in admin.list_consumer_groups()}
    admin.close()
    assert groups_after == groups_before  # never joined or committed for any group


def test_replay_dead_letters_a_text_that_fails_inference_alone_and_writes_the_others(
        kafka_bootstrap, make_topic, unique, tmp_path):
    topic = make_topic(f"{unique}-src", partitions=2)
    inside = _fill(kafka_bootstrap, topic)
    out = str(tmp_path / "out")
    engine, _ = fake_engine(["cpu"], precision="fp32")
    classify_each = engine.classify_each

    def one_fails(texts: list[str]) -> list[object]:  # as the engine reports a text that fails on its own
        return [RuntimeError("boom on this text") if text == "inside 2 on 1" else result
                for text, result in zip(texts, classify_each(texts))]

    engine.classify_each = one_fails
    with engine:
        job = KafkaBackfill(_cfg(kafka_bootstrap, topic, out, rows_per_file=3), topic, T0 + 100_000, T0 + 200_000)
        assert job.plan() == 16
        summary = job.run(engine)
    assert summary.rows == 11 and summary.dead_lettered == 5
    table = read_output(out)
    assert sorted(table.column("id").to_pylist()) == sorted(set(inside) - {"in-1-2"})
    dead = read_topic(kafka_bootstrap, f"{topic}.dlq", expected=5)
    failed = [dict(r.headers) for r in dead if dict(r.headers)[HEADER_CLASS] == b"RuntimeError"]
    assert len(dead) == 5 and len(failed) == 1
    assert (failed[0][HEADER_PARTITION], failed[0][HEADER_OFFSET]) == (b"1", b"7")
    assert failed[0][HEADER_MESSAGE] == b"classification failed: boom on this text"


def test_cli_errors_unreachable_broker_and_empty_range_are_one_line_exit_1(kafka_bootstrap, make_topic, unique,
                                                                           tmp_path):
    topic = make_topic(f"{unique}-empty", partitions=1)
    produce(kafka_bootstrap, topic, [(None, b'{"text": "x"}')], timestamp_ms=T0)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    env = dict(os.environ, NLPSTREAM_KAFKA__STARTUP_TIMEOUT="2", HF_HUB_OFFLINE="1")
    base = [sys.executable, "-m", "nlpstream.jobs.cli", "backfill", "--kafka-topic", topic, "--output",
            str(tmp_path / "out"), "--devices", "cpu", "--precision", "fp32"]
    cases = {
        f"cannot connect to Kafka at 127.0.0.1:{dead}": ["--bootstrap-servers", f"127.0.0.1:{dead}"],
        f"topic {topic!r} holds no record with a timestamp in": ["--bootstrap-servers", kafka_bootstrap,
                                                                  "--from-time", FROM, "--to-time", TO],
        "is not an ISO-8601 time": ["--bootstrap-servers", kafka_bootstrap, "--from-time", "yesterday"],
    }
    for message, args in cases.items():
        proc = subprocess.run(base + args, capture_output=True, text=True, timeout=300, env=env)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 1 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_an_empty_range_is_refused_before_anything_is_written(kafka_bootstrap, make_topic, unique, tmp_path):
    topic = make_topic(f"{unique}-none", partitions=1)
    produce(kafka_bootstrap, topic, [(None, b'{"text": "x"}')], timestamp_ms=T0)
    cfg = _cfg(kafka_bootstrap, topic, str(tmp_path / "out"))
    with pytest.raises(BackfillError, match="holds no record"):
        KafkaBackfill(cfg, topic, T0 + 1, T0 + 2).plan()
    with pytest.raises(BackfillError, match="must be before"):
        KafkaBackfill(cfg, topic, T0 + 2, T0 + 1)
    assert not (tmp_path / "out").exists()


def test_replay_of_an_avro_topic_decodes_through_the_schema_registry(kafka_bootstrap, make_topic, unique, tmp_path,
                                                                     schema_registry_url):
    """The schema'd formats go through the stream job's RegistryDecoder; a record without the wire format is
    dead-lettered with the stream job's reason."""
    import io
    import struct

    import fastavro
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    schema = {"type": "record", "name": "Ticket", "namespace": "nlpstream.backfill", "fields": [
        {"name": "id", "type": "string"},
        {"name": "body", "type": {"type": "record", "name": "Body", "fields": [{"name": "text", "type": "string"}]}}]}
    schema_id = SchemaRegistryClient({"url": schema_registry_url}).register_schema(
        f"{unique}-value", Schema(json.dumps(schema), "AVRO"))
    values = []
    for i in range(4):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), {"id": f"av{i}", "body": {"text": f"avro {i}"}})
        values.append(struct.pack(">bI", 0, schema_id) + buf.getvalue())
    values.insert(2, b'{"id": "plain json"}')
    topic = make_topic(f"{unique}-avro", partitions=1)
    produce(kafka_bootstrap, topic, [(None, v) for v in values], partition=0)
    cfg = _cfg(kafka_bootstrap, topic, str(tmp_path / "out"), **{
        "input.input_format": "avro", "input.schema_registry.url": schema_registry_url, "text_field": "body.text"})
    engine, _ = fake_engine(["cpu"], precision="fp32")
    with engine:
        job = KafkaBackfill(cfg, topic, None, None)
        assert job.plan() == 5
        summary = job.run(engine)
    assert summary.rows == 4 and summary.dead_lettered == 1
    rows = read_output(tmp_path / "out").to_pylist()
    assert sorted((r["id"], r["text"], r["offset"]) for r in rows) == [
        ("av0", "avro 0", 0), ("av1", "avro 1", 1), ("av2", "avro 2", 3), ("av3", "avro 3", 4)]
    (dead,) = read_topic(kafka_bootstrap, f"{topic}.dlq", expected=1)
    assert dict(dead.headers)[HEADER_CLASS] == b"DecodeError:no_magic_byte"
    assert dict(dead.headers)[HEADER_OFFSET] == b"2"
