"""Shared fixtures: a real Kafka broker, unique topics and groups, the builtin engine.

Broker, in order: ``KAFKA_BOOTSTRAP_SERVERS``; testcontainers' Kafka
container where a Docker daemon answers; else the project's local KRaft
launcher (official jars). Kafka tests never skip: no broker is a failure.
Schema registry: ``SCHEMA_REGISTRY_URL`` (a Confluent-compatible API), else the
project's local Apicurio launcher (``nlpstream registry-local``).
S3: a real S3 API server (moto in server mode, its own process, IAM checks on;
see tests/s3.py) and a fresh bucket per test.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means no usable daemon
        return False


def warm_group_coordinator(bootstrap: str) -> None:
    """Commit once for a throwaway group, so a fresh broker's ``__consumer_offsets`` exists before the first test.

    Otherwise the first group of a session meets the coordinator while that topic is being created, and
    kafka-python logs WARNINGs (NotCoordinatorError) that tests asserting quiet logs would see.
    """
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
    from kafka.admin import NewTopic
    from kafka.structs import OffsetAndMetadata

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic("nlpstream-tests-warm-up", 1, 1)])
    finally:
        admin.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id="nlpstream-tests-warm-up", enable_auto_commit=False)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                consumer.commit({TopicPartition("nlpstream-tests-warm-up", 0): OffsetAndMetadata(0, "", -1)})
                return
            except Exception:  # noqa: BLE001 - the coordinator is still loading; fail below only if it never does
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        consumer.close()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    if os.environ.get("NLPSTREAM_TEST_DOCKER", "1") == "1" and _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:4.1.1").with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    from nlpstream.consumers import kafka_local

    data = tmp_path_factory.mktemp("kafka-broker")
    info = kafka_local.start(data, port=0, timeout_s=120)
    try:
        warm_group_coordinator(info.bootstrap_servers)
        yield info.bootstrap_servers
    finally:
        kafka_local.stop(data)


@pytest.fixture(scope="session")
def schema_registry_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("SCHEMA_REGISTRY_URL")
    if external:
        yield external
        return
    from nlpstream.consumers import registry_local

    data = tmp_path_factory.mktemp("schema-registry")
    info = registry_local.start(data, port=0)
    try:
        yield info.url
    finally:
        registry_local.stop(data)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests import s3

    server = s3.start(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: Any, unique: str) -> str:
    """A new empty bucket on the test S3 server."""
    return s3_server.make_bucket(unique.lower())


@pytest.fixture
def unique() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_topic(kafka_bootstrap: str) -> Any:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    def _make(name: str, partitions: int = 3) -> str:
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            admin.create_topics([NewTopic(name, partitions, 1)])
        finally:
            admin.close()
        return name

    return _make


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]],
            partition: int | None = None, timestamp_ms: int | None = None, **client: Any) -> None:
    """Send ``messages`` and wait for every acknowledgement; ``client`` adds producer settings (SASL...)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2, **client)
    try:
        for key, value in messages:
            producer.send(topic, key=key, value=value, partition=partition, timestamp_ms=timestamp_ms)
        producer.flush(timeout=60)
    finally:
        producer.close()


def json_messages(n: int, prefix: str = "m", key_field: str | None = None) -> list[tuple[bytes | None, bytes]]:
    texts = ["The package never arrived and support ignores me.", "Thanks, the refund came through quickly!",
             "What are your opening hours?", "Shares plunged after the profit warning.",
             "The company raised its full-year guidance.", "The board meets on Tuesday."]
    out = []
    for i in range(n):
        obj: dict[str, Any] = {"id": f"{prefix}-{i}", "text": f"{texts[i % len(texts)]} #{i}"}
        out.append((f"k{i}".encode(), json.dumps(obj).encode()))
    return out


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list[Any]:
    """Every record of ``topic`` from the beginning, waiting until ``expected`` arrived or timeout."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        deadline = time.monotonic() + timeout_s
        parts: set[int] = set()
        while not parts and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic) or set()
            if not parts:
                time.sleep(0.3)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        # a short extra poll catches records beyond the expected count
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
        return records
    finally:
        consumer.close()


def read_output(path: Path) -> Any:
    """The output folder as one Arrow table (hive partitioning: topic and date columns)."""
    import pyarrow.dataset as ds

    return ds.dataset(str(path), format="parquet", partitioning="hive").to_table()


@pytest.fixture(scope="session")
def engine() -> Iterator[Any]:
    """The builtin model in the engine's reference path (fp32, no cache): deterministic."""
    from nlpstream.inference import load_engine

    with load_engine("builtin:sentiment", devices="cpu", precision="fp32", cache_entries=0) as eng:
        yield eng


@pytest.fixture(scope="session")
def fast_engine() -> Iterator[Any]:
    """The builtin model as ``precision=auto`` runs it on CPU (OpenVINO int8 + guard), no cache."""
    from nlpstream.inference import load_engine

    with load_engine("builtin:sentiment", devices="cpu", precision="auto", cache_entries=0) as eng:
        yield eng


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    """In CI (CI=true) a skipped test is a failure: Kafka and model tests must run."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {report.longrepr}"
