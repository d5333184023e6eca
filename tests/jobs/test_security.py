"""SASL/SCRAM, SASL_SSL and mutual TLS end to end against a real broker; secrets never leak."""

from __future__ import annotations

import logging
import urllib.request

import pytest

from nlpstream.consumers import kafka_local
from nlpstream.consumers.errors import ConsumerError
from nlpstream.jobs.config import load_config, StreamConfig
from nlpstream.jobs.stream import StreamJob
from tests.conftest import json_messages, produce, read_output
from tests.tls import TlsFiles, make_tls_files

pytestmark = [pytest.mark.kafka, pytest.mark.model]
PASSWORD = "pa55-w0rd-never-logged"
KEY_PASSWORD = "k3y-pa55-never-logged"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"), KEY_PASSWORD)


@pytest.fixture(scope="module")
def scram_broker(tmp_path_factory, tls_files):
    """One broker with PLAINTEXT, SASL_PLAINTEXT, SSL (client certificate required) and SASL_SSL listeners."""
    data = tmp_path_factory.mktemp("secure-broker")
    tls = kafka_local.BrokerTls(ca_file=str(tls_files.ca), keystore_file=str(tls_files.broker_keystore))
    info = kafka_local.start(data, port=0, timeout_s=120, scram_users={"alice": PASSWORD}, tls=tls)
    try:
        yield info
    finally:
        kafka_local.stop(data)


def _run_secure_job(kafka: dict, topic: str, tmp_path, engine, caplog, client: str, n: int = 40) -> StreamJob:
    cfg = load_config(StreamConfig, None, {
        **{f"kafka.{k}": v for k, v in kafka.items()}, "kafka.topics": [topic], "kafka.group_id": f"{topic}-g",
        "kafka.client": client,
        "output.output": str(tmp_path / "out"), "output.flush_interval": 0.5,
        "metrics.metrics_port": 0, "max_messages": n, "idle_timeout": 60.0,
    })
    caplog.set_level(logging.DEBUG)
    job = StreamJob(cfg, engine=engine)
    summary = job.run()
    assert summary.labeled == n
    table = read_output(tmp_path / "out")
    assert sorted(table.column("offset").to_pylist()) == list(range(n))
    return job


def _scrape(job: StreamJob) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{job.metrics_port}/metrics", timeout=10).read().decode()


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_scram_stream_with_password_from_file(scram_broker, tmp_path, engine, caplog, monkeypatch, unique,
                                               client):
    produce(scram_broker.sasl_bootstrap_servers, unique, json_messages(50, prefix=unique),
            security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username="alice", sasl_plain_password=PASSWORD)
    secret = tmp_path / "kafka-password"
    secret.write_text(PASSWORD + "\n")
    monkeypatch.setenv("NLPSTREAM_KAFKA__SASL_PASSWORD_FILE", str(secret))
    cfg = load_config(StreamConfig, None, {
        "kafka.bootstrap_servers": scram_broker.sasl_bootstrap_servers, "kafka.topics": [unique],
        "kafka.group_id": f"{unique}-g", "kafka.security_protocol": "SASL_PLAINTEXT",
        "kafka.sasl_mechanism": "SCRAM-SHA-256", "kafka.sasl_username": "alice", "kafka.client": client,
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


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_mutual_tls_stream_with_key_password_from_file(scram_broker, tls_files, tmp_path, engine, caplog, unique,
                                                        client):
    producer = {"security_protocol": "SSL", "ssl_cafile": str(tls_files.ca), "ssl_certfile": str(tls_files.client_cert),
                "ssl_keyfile": str(tls_files.client_key), "ssl_password": KEY_PASSWORD}
    produce(scram_broker.ssl_bootstrap_servers, unique, json_messages(40, prefix=unique), **producer)
    secret = tmp_path / "key-password"
    secret.write_text(KEY_PASSWORD + "\n")
    job = _run_secure_job({"bootstrap_servers": scram_broker.ssl_bootstrap_servers, "security_protocol": "SSL",
                           "ssl_cafile": str(tls_files.ca), "ssl_certfile": str(tls_files.client_cert),
                           "ssl_keyfile": str(tls_files.client_key), "ssl_password_file": str(secret)},
                          unique, tmp_path, engine, caplog, client)
    dead = job.config.dlq_topic()
    assert dead == f"{unique}.dlq"
    assert KEY_PASSWORD not in _scrape(job)
    assert KEY_PASSWORD not in caplog.text


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_sasl_ssl_scram_stream_with_password_from_env(scram_broker, tls_files, tmp_path, engine, caplog,
                                                       monkeypatch, unique, client):
    producer = {"security_protocol": "SASL_SSL", "ssl_cafile": str(tls_files.ca), "sasl_mechanism": "SCRAM-SHA-256",
                "sasl_plain_username": "alice", "sasl_plain_password": PASSWORD}
    produce(scram_broker.sasl_ssl_bootstrap_servers, unique, json_messages(40, prefix=unique), **producer)
    monkeypatch.setenv("NLPSTREAM_KAFKA__SASL_PASSWORD", PASSWORD)
    job = _run_secure_job({"bootstrap_servers": scram_broker.sasl_ssl_bootstrap_servers,
                           "security_protocol": "SASL_SSL", "ssl_cafile": str(tls_files.ca),
                           "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "alice"},
                          unique, tmp_path, engine, caplog, client)
    assert PASSWORD not in _scrape(job)
    assert PASSWORD not in caplog.text


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
@pytest.mark.parametrize("case", ["no client certificate", "brokers' CA not trusted"])
def test_tls_misconfiguration_is_a_clear_error(scram_broker, tls_files, tmp_path, engine, caplog, unique, case, client):
    """The job's start-up check of the brokers (the same for both clients) fails with one clear error; librdkafka
    alone would retry the handshake for ever."""
    kafka = {"bootstrap_servers": scram_broker.ssl_bootstrap_servers, "security_protocol": "SSL",
             "ssl_cafile": str(tls_files.ca)}
    if case != "no client certificate":
        kafka.update(ssl_cafile=str(tls_files.other_ca), ssl_certfile=str(tls_files.client_cert),
                     ssl_keyfile=str(tls_files.client_key), ssl_password=KEY_PASSWORD)
    cfg = load_config(StreamConfig, None, {
        **{f"kafka.{k}": v for k, v in kafka.items()}, "kafka.topics": [unique], "kafka.group_id": f"{unique}-g",
        "output.output": str(tmp_path / "out"), "metrics.metrics_port": 0, "max_messages": 1, "kafka.client": client,
    })
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConsumerError, match="TLS handshake failed") as failure:
        StreamJob(cfg, engine=engine).run()
    assert scram_broker.ssl_bootstrap_servers in str(failure.value)
    assert KEY_PASSWORD not in str(failure.value) and KEY_PASSWORD not in caplog.text
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.parquet"))
