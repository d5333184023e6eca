"""Schema'd topics against a real local Schema Registry (Apicurio, Confluent-compatible API) and a real broker.

Records are written by confluent-kafka's own serializers where it has one
(Avro, JSON Schema, Protobuf from a message class), and framed by hand for
Protobuf schemas registered as ``.proto`` text, as Java producers do.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import urllib.request

import pytest

from nlpstream.jobs.config import InputConfig, KafkaConfig, MetricsConfig, ModelConfig, OutputConfig, StreamConfig
from nlpstream.jobs.config import AlertConfig, SchemaRegistryConfig
from nlpstream.jobs.stream import StreamJob
from tests.conftest import produce, read_output, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.model]

AVRO = json.dumps({"type": "record", "name": "Ticket", "namespace": "nlpstream.test", "fields": [
    {"name": "id", "type": "string"},
    {"name": "body", "type": {"type": "record", "name": "Body", "fields": [{"name": "text", "type": "string"}]}},
]})
AVRO_NO_BODY = json.dumps({"type": "record", "name": "Ping", "namespace": "nlpstream.test",
                           "fields": [{"name": "id", "type": "string"}]})
AVRO_INT_BODY = json.dumps({"type": "record", "name": "Odd", "namespace": "nlpstream.test", "fields": [
    {"name": "id", "type": "string"},
    {"name": "body", "type": {"type": "record", "name": "IntBody", "fields": [{"name": "text", "type": "int"}]}},
]})
JSON_SCHEMA = json.dumps({"$schema": "http://json-schema.org/draft-07/schema#", "title": "Post", "type": "object",
                          "properties": {"id": {"type": "string"},
                                         "body": {"type": "object", "properties": {"text": {"type": "string"}}}},
                          "required": ["id", "body"]})
PROTO = """syntax = "proto3";
package nlpstream.test;
message Chat {
  string id = 1;
  message Body { string text = 1; }
  Body body = 2;
  int32 stars = 3;
}
"""
TEXTS = ["The refund never arrived and nobody answers", "Thanks, the new card works perfectly",
         "Shares slid after the guidance cut", "Where can I change my delivery address?"]


def _client(url: str):
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient({"url": url})


def _register(url: str, subject: str, schema_str: str, schema_type: str) -> int:
    from confluent_kafka.schema_registry import Schema

    return _client(url).register_schema(subject, Schema(schema_str, schema_type))


def _frame(schema_id: int, payload: bytes) -> bytes:
    return struct.pack(">bI", 0, schema_id) + payload


def _serialize(kind: str, url: str, topic: str, objs: list[dict]) -> list[bytes]:
    from confluent_kafka.serialization import MessageField, SerializationContext

    ctx = SerializationContext(topic, MessageField.VALUE)
    client = _client(url)
    if kind == "avro":
        from confluent_kafka.schema_registry.avro import AvroSerializer

        ser = AvroSerializer(client, AVRO)
        return [ser(o, ctx) for o in objs]
    if kind == "json-schema":
        from confluent_kafka.schema_registry.json_schema import JSONSerializer

        ser = JSONSerializer(JSON_SCHEMA, client)
        return [ser(o, ctx) for o in objs]
    from confluent_kafka.schema_registry.protobuf import ProtobufSerializer

    chat = _proto_class()
    ser = ProtobufSerializer(chat, client, {"use.deprecated.format": False})
    out = []
    for o in objs:
        msg = chat(id=o["id"])
        msg.body.text = o["body"]["text"]
        out.append(ser(msg, ctx))
    return out


def _proto_class():
    from google.protobuf import descriptor_pool, message_factory

    from nlpstream.consumers.schema_registry import _descriptor_protos

    pool = descriptor_pool.DescriptorPool()
    for f in _descriptor_protos(0, PROTO, []):
        pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("nlpstream.test.Chat"))


def _config(bootstrap, topic, out, fmt, url, **kw) -> StreamConfig:
    return StreamConfig.model_construct(
        kafka=KafkaConfig(bootstrap_servers=bootstrap, topics=[topic], group_id=f"{topic}-g", dlq_topic=f"{topic}.dlq",
                          client=kw.pop("client", "kafka-python")),
        input=InputConfig(input_format=fmt, text_field="body.text", id_field="id",
                          schema_registry=SchemaRegistryConfig(url=url, retry_max_s=kw.pop("retry_max_s", 30.0))),
        model=ModelConfig(devices="cpu"), output=OutputConfig(output=str(out), flush_interval=0.5),
        alerts=AlertConfig(message_min_score=None), metrics=MetricsConfig(metrics_port=kw.pop("metrics_port", None)),
        max_messages=kw.pop("max_messages", None), idle_timeout=kw.pop("idle_timeout", 60.0),
    )


def _dlq_reasons(bootstrap: str, topic: str, expected: int) -> dict[int, str]:
    dead = read_topic(bootstrap, f"{topic}.dlq", expected=expected)
    out = {}
    for r in dead:
        headers = dict(r.headers)
        out[int(headers["nlpstream.source.offset"])] = headers["nlpstream.error.class"].decode()
    assert len(dead) == len(out) == expected, out
    return out


@pytest.mark.parametrize("fmt", ["avro", "json-schema", "protobuf"])
def test_each_format_labels_nested_text_and_dead_letters_each_bad_kind(
        fmt, schema_registry_url, kafka_bootstrap, make_topic, unique, tmp_path, engine):
    url = schema_registry_url
    topic = make_topic(unique, partitions=1)
    good = [{"id": f"{unique}-{i}", "body": {"text": f"{TEXTS[i % len(TEXTS)]} #{i}"}} for i in range(12)]
    values = _serialize(fmt, url, topic, good)
    own_id = struct.unpack(">I", values[0][1:5])[0]
    bad: list[tuple[bytes, str]] = [
        (b'{"id": "plain json"}', "no_magic_byte"),
        (_frame(987_654, b"\x00\x01"), "unknown_schema_id"),
        (_frame(own_id, b"\xff\xff\xff\xff\x0f\x01"), "schema_mismatch"),
    ]
    if fmt == "avro":
        bad.append((_serialize_with(url, f"{unique}-ping", AVRO_NO_BODY, {"id": "no body"}), "missing_text"))
        bad.append((_serialize_with(url, f"{unique}-odd", AVRO_INT_BODY, {"id": "int", "body": {"text": 7}}),
                    "text_not_string"))
    elif fmt == "json-schema":
        bad.append((_frame(own_id, json.dumps({"id": "x"}).encode()), "schema_mismatch"))  # body required
        loose = _register(url, f"{unique}-loose", json.dumps({"$schema": "http://json-schema.org/draft-07/schema#",
                                                              "title": "Loose", "type": "object"}), "JSON")
        bad.append((_frame(loose, json.dumps({"id": "y", "body": {}}).encode()), "missing_text"))
        bad.append((_frame(loose, json.dumps({"id": "z", "body": {"text": 3}}).encode()), "text_not_string"))
    else:
        # a schema registered as .proto text (as Java producers do), framed by hand with message index [0]
        text_id = _register(url, f"{unique}-proto-text", PROTO, "PROTOBUF")
        chat = _proto_class()
        msg = chat(id=f"{unique}-text")
        msg.body.text = "Registered as proto text, still read fine"
        values.append(_frame(text_id, b"\x00" + msg.SerializeToString()))
        good.append({"id": f"{unique}-text"})
        bad.append((_frame(text_id, b"\x00" + chat(id="empty", stars=3).SerializeToString()), "missing_text"))
        avro_id = _register(url, f"{unique}-avro", AVRO, "AVRO")
        bad.append((_frame(avro_id, b"\x00"), "schema_mismatch"))  # an Avro schema on a Protobuf input
    messages = [(None, v) for v in values] + [(f"bad-{i}".encode(), v) for i, (v, _) in enumerate(bad)]
    produce(kafka_bootstrap, topic, messages)
    summary = StreamJob(_config(kafka_bootstrap, topic, tmp_path, fmt, url, max_messages=len(messages)),
                        engine=engine).run()
    assert summary.labeled == len(good) and summary.dead_lettered == len(bad)
    table = read_output(tmp_path)
    assert sorted(table.column("id").to_pylist()) == sorted(g["id"] for g in good)
    reasons = _dlq_reasons(kafka_bootstrap, topic, len(bad))
    assert [reasons[len(values) + i] for i in range(len(bad))] == [f"DecodeError:{kind}" for _, kind in bad]
    dead = read_topic(kafka_bootstrap, f"{topic}.dlq", expected=len(bad))
    assert sorted(r.value for r in dead) == sorted(v for v, _ in bad)  # the original bytes


def _serialize_with(url: str, subject: str, schema_str: str, obj: dict) -> bytes:
    import io

    import fastavro

    schema_id = _register(url, subject, schema_str, "AVRO")
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(json.loads(schema_str)), obj)
    return _frame(schema_id, buf.getvalue())


class CuttableProxy:
    """A TCP forwarder in front of the registry whose link can be cut (connections refused) and restored."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            self._cut_locked()

    def _cut_locked(self) -> None:
        if self._listener is not None:
            try:  # wakes the thread blocked in accept(); close() alone leaves the kernel socket listening
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    continue
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _end_offsets(bootstrap: str, topic: str, partitions: int) -> list[int]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return [ends[TopicPartition(topic, p)] for p in range(partitions)]
    finally:
        consumer.close()


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_registry_outage_mid_stream_loses_nothing_and_dead_letters_nothing(
        schema_registry_url, kafka_bootstrap, make_topic, unique, tmp_path, engine, caplog, client):
    """The link to the registry is cut while records of a schema version the job has not seen arrive.

    Nothing of them is labeled, dead-lettered or committed during the outage; the job is even stopped
    mid-outage, and a fresh job in the same group after the link is back labels each exactly once.
    """
    import io
    from urllib.parse import urlsplit

    import fastavro

    from nlpstream.jobs import metrics as job_metrics
    from tests.jobs.faults import committed

    job_metrics.SCHEMA_REGISTRY_OUTAGE.set(0)  # one registry per process: start from a known value
    url = schema_registry_url
    target = urlsplit(url)
    proxy = CuttableProxy(target.port)
    via_proxy = f"{target.scheme}://127.0.0.1:{proxy.port}{target.path}"
    topic = make_topic(unique, partitions=2)
    group = f"{topic}-g"
    first = [{"id": f"{unique}-a{i}", "body": {"text": TEXTS[i % 4]}} for i in range(30)]
    produce(kafka_bootstrap, topic, [(None, v) for v in _serialize("avro", url, topic, first)])
    job = StreamJob(_config(kafka_bootstrap, topic, tmp_path, "avro", via_proxy, idle_timeout=120.0, metrics_port=0,
                            retry_max_s=1.0, client=client), engine=engine)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("summary", job.run()))
    runner.start()
    second_ids = [f"{unique}-b{i}" for i in range(40)]
    try:
        deadline = time.monotonic() + 120
        while job.summary.labeled < len(first) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job.summary.labeled == len(first)
        deadline = time.monotonic() + 30  # the first records' offsets are committed
        before_v2 = _end_offsets(kafka_bootstrap, topic, 2)
        while committed(kafka_bootstrap, group, topic, 2) != before_v2 and time.monotonic() < deadline:
            time.sleep(0.2)
        proxy.cut()
        # a new schema version the job has never seen: its records can only wait for the registry
        v2 = json.dumps({**json.loads(AVRO), "fields": json.loads(AVRO)["fields"]
                         + [{"name": "channel", "type": "string", "default": "chat"}]})
        v2_id = _register(url, f"{topic}-value", v2, "AVRO")
        second = []
        for i, record_id in enumerate(second_ids):
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, fastavro.parse_schema(json.loads(v2)),
                                       {"id": record_id, "body": {"text": TEXTS[i % 4]}, "channel": "mail"})
            second.append((None, _frame(v2_id, buf.getvalue())))
        produce(kafka_bootstrap, topic, second)
        deadline = time.monotonic() + 60
        metrics = ""
        while time.monotonic() < deadline:
            metrics = _scrape(job.metrics_port)
            if "nlpstream_schema_registry_outage 1.0" in metrics:
                break
            time.sleep(0.2)
        assert "nlpstream_schema_registry_outage 1.0" in metrics, job.summary
        time.sleep(4)  # several retries while the link is down
        assert job.summary.labeled == len(first) and job.summary.dead_lettered == 0
        assert job.summary.consumed == len(first)  # the waiting records were put back, not taken
        assert committed(kafka_bootstrap, group, topic, 2) == before_v2  # nothing of them committed
    finally:
        job.stop()  # stopped in the middle of the outage
        runner.join(timeout=120)
    assert result["summary"].labeled == len(first) and result["summary"].dead_lettered == 0
    assert committed(kafka_bootstrap, group, topic, 2) == before_v2
    proxy.restore()
    try:
        again = StreamJob(_config(kafka_bootstrap, topic, tmp_path, "avro", via_proxy, idle_timeout=5.0, client=client),
                          engine=engine).run()
    finally:
        proxy.cut()
    assert again.labeled == len(second) and again.dead_lettered == 0
    ids = read_output(tmp_path).column("id").to_pylist()
    assert sorted(ids) == sorted([f["id"] for f in first] + second_ids)  # each exactly once
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "schema registry" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one WARNING for the outage, not one per retry
