"""SASL/SCRAM end to end against a real broker; the password never leaks."""

from __future__ import annotations

import logging
import urllib.request

import pytest

from consumers import kafka_local
from jobs.config import load_config, StreamConfig
from jobs.stream import StreamJob
from tests.conftest import json_messages, produce, read_output

pytestmark = [pytest.mark.kafka, pytest.mark.model]
PASSWORD = "pa55-w0rd-never-logged"


@pytest.fixture(scope="module")
def scram_broker(tmp_path_factory):
    data = tmp_path_factory.mktemp("scram-broker")
    info = kafka_local.start(data, port=0, timeout_s=120, scram_users={"alice": PASSWORD})
    try:
        yield info
    finally:
        kafka_local.stop(data)


def test_scram_stream_with_password_from_file(scram_broker, tmp_path, engine, caplog, monkeypatch, unique):
    produce(scram_broker.sasl_bootstrap_servers, unique, json_messages(50, prefix=unique),
            security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username="alice", sasl_plain_password=PASSWORD)
    secret = tmp_path / "kafka-password"
    secret.write_text(PASSWORD + "\n")
    monkeypatch.setenv("NLPSTREAM_KAFKA__SASL_PASSWORD_FILE", str(secret))
    cfg = load_config(StreamConfig, None, {
        "kafka.bootstrap_servers": scram_broker.sasl_bootstrap_servers, "kafka.topics": [unique],
        "kafka.group_id": f"{unique}-g", "kafka.security_protocol": "SASL_PLAINTEXT",
        "kafka.sasl_mechanism": "SCRAM-SHA-256", "kafka.sasl_username": "alice",
        "output.output": str(tmp_path / "out"), "output.flush_interval": 0.5,
        "metrics.metrics_port": 0, "max_messages": 50, "idle_timeout": 60.0,
    })
    caplog.set_level(logging.DEBUG)
    job = StreamJob(cfg, engine=engine)
    summary = job.run()
    assert summary.labeled == 50
    assert read_output(tmp_path / "out").num_rows == 50
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{job.metrics_port}/metrics", timeout=10).read().decode()
    assert PASSWORD not in metrics
    assert PASSWORD not in caplog.text
    assert PASSWORD not in repr(cfg) and PASSWORD not in str(cfg.redacted())


def test_wrong_scram_password_is_refused(scram_broker, unique):
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    with pytest.raises(KafkaError):
        producer = KafkaProducer(bootstrap_servers=scram_broker.sasl_bootstrap_servers,
                                 security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
                                 sasl_plain_username="alice", sasl_plain_password="wrong", max_block_ms=5000)
        producer.send(unique, b"x").get(timeout=10)
