"""The wiring of the stream job: from the config to the sink, the DLQ, the alert sinks, transactions, the
registry decoder and the consumer settings.

Two steps, in the order the job has always taken them (cheap checks first:
a mistake costs one line, not a model load or a wait for Kafka):
:func:`check_and_build_sink` checks the output and the model options and
builds the row sink; then, once the job serves its metrics,
:func:`wire` waits for Kafka, loads the engine and builds the rest,
returning it as :class:`Parts`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nlpstream.consumers import DecodeSettings
from nlpstream.consumers.client_config import (ConnectionSettings, connect_error, quiet_topic_creation,
                                                wait_for_kafka)
from nlpstream.consumers.errors import DECODE_KINDS, KafkaUnavailableError
from nlpstream.consumers.dlq import DeadLetterQueue, resend_failed
from nlpstream.consumers.kafka_input import ConsumerSettings
from nlpstream.consumers.schema_registry import REGISTRY_FORMATS, RegistryDecoder
from nlpstream.inference import Engine, load_engine
from nlpstream.inference.preflight import check_engine_options
from nlpstream.jobs import metrics
from nlpstream.jobs.alerts import AlertRules
from nlpstream.jobs.config import OutputConfig, StreamConfig
from nlpstream.jobs.shared import LOGGER_NAME
from nlpstream.jobs.transactions import PartitionTransactions
from nlpstream.sinks import (AlertSink, DeltaSink, FileAlertSink, IcebergSink, KafkaAlertSink, ParquetSink,
                             WebhookAlertSink, check_output)
from nlpstream.sinks.schema import warm_up_arrow

log = logging.getLogger(LOGGER_NAME)
DEAD_LETTER_REASONS = (*DECODE_KINDS, "inference")  # the ``reason`` label of nlpstream_messages_dead_lettered_total


def connection_settings(config: StreamConfig) -> ConnectionSettings:
    """Connection settings for kafka-python clients, secrets resolved at the last moment."""
    k = config.kafka
    return ConnectionSettings(
        bootstrap_servers=k.bootstrap_servers,
        security_protocol=k.security_protocol,
        sasl_mechanism=k.sasl_mechanism,
        sasl_username=k.sasl_username,
        sasl_password=k.password(),
        ssl_cafile=k.ssl_cafile,
        ssl_certfile=k.ssl_certfile,
        ssl_keyfile=k.ssl_keyfile,
        ssl_password=k.key_password(),
    )


def build_sink(output: OutputConfig, heads: Sequence[str] = ()) -> Any:
    """The row sink of ``output.format``; a table sink checks its table (or catalog) first (SinkError)."""
    if output.format == "delta":  # storage_options here are delta-rs's (object_store keys, e.g. AWS_ENDPOINT_URL)
        sink: Any = DeltaSink(output.output, output.include_text, heads, storage_options=output.storage_options)
    elif output.format == "iceberg":
        sink = IcebergSink(output.iceberg.catalog, output.iceberg.table or "", output.include_text, heads)
    else:
        return ParquetSink(output.output, output.include_text, output.compression,
                           storage_options=output.storage_options, skip_written=output.skip_written)
    sink.check()
    return sink


def engine_head_names(engine: Any, model: str) -> list[str]:
    """The heads' names, first the main one: from a loaded engine, else read from the model spec."""
    if engine is not None:
        heads = getattr(engine, "heads", None)
        return [name for name, _ in heads] if heads else [""]
    from nlpstream.inference.heads import head_names

    return head_names(model)


def check_and_build_sink(cfg: StreamConfig, engine: Engine | None, rules: AlertRules) -> Any:
    """Check the output, the engine options and the alert rules' heads; build the row sink (its table checked)."""
    if cfg.output.format != "iceberg":  # an iceberg table lives in its catalog, checked with the sink
        check_output(cfg.output.output, cfg.output.storage_options)
    if engine is None:
        check_engine_options(**cfg.model.engine_options())
    head_names = engine_head_names(engine, cfg.model.model)
    rules.check_heads(head_names)
    sink = build_sink(cfg.output, head_names[1:])  # a table's columns and catalog checked here
    warm_up_arrow()
    return sink


@dataclass
class Parts:
    """What the stream job runs with, besides the row sink: built by :func:`wire`."""

    engine: Engine
    conn: ConnectionSettings
    settings: ConsumerSettings  # with ``conn``: what a (re)built KafkaInput is made of
    decode: DecodeSettings
    registry: RegistryDecoder | None  # schema'd input formats only
    dlq: DeadLetterQueue
    alert_sinks: list[AlertSink]
    alert_producer: Any  # the KafkaProducer of the alert topic without transactions, else None
    txn: PartitionTransactions | None  # kafka.transactions


def alert_key_fields(cfg: StreamConfig) -> tuple[str, ...]:
    """The message fields whose first present value keys the window alert rule (``alerts.window_key_field``)."""
    return tuple(f.strip() for f in (cfg.alerts.window_key_field or "").split(",") if f.strip())


def wire(cfg: StreamConfig, engine: Engine | None) -> Parts:
    """Wait for Kafka, load the engine (unless given) and build the job's parts from the config."""
    registry = None
    keep = alert_key_fields(cfg)  # the only other fields the job reads of a message
    decode = DecodeSettings(cfg.input.input_format, cfg.input.text_field, cfg.input.id_field, keep_fields=keep)
    if cfg.input.input_format in REGISTRY_FORMATS:
        sr = cfg.input.schema_registry
        registry = RegistryDecoder(cfg.input.input_format, sr.url or "", sr.username, sr.secret(), sr.ca_file)
        metrics.SCHEMA_REGISTRY_OUTAGE.set(0)
        decode = DecodeSettings(cfg.input.input_format, cfg.input.text_field, cfg.input.id_field, registry=registry,
                                keep_fields=keep)
    conn = connection_settings(cfg)
    quiet_topic_creation([cfg.dlq_topic(), cfg.alerts.alert_topic])
    wait_for_kafka(conn, cfg.kafka.startup_timeout, log)
    with contextlib.ExitStack() as built:  # what was built is closed again when a later part fails
        if engine is None:
            engine = load_engine(**cfg.model.engine_options())
            built.callback(engine.close)
        dlq = DeadLetterQueue(conn, cfg.dlq_topic())
        built.callback(dlq.close)
        alert_sinks: list[AlertSink] = []
        alert_producer = None
        if cfg.alerts.alert_file:
            alert_sinks.append(FileAlertSink(cfg.alerts.alert_file))
            built.callback(alert_sinks[-1].close)
        if cfg.alerts.alert_webhook_url:
            token = cfg.alerts.alert_webhook_token
            auth = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
            alert_sinks.append(WebhookAlertSink(cfg.alerts.alert_webhook_url, headers=auth))
            built.callback(alert_sinks[-1].close)
        txn = None
        if cfg.kafka.transactions:
            prefix = cfg.kafka.transactional_id_prefix or f"nlpstream-{cfg.kafka.group_id}"
            txn = PartitionTransactions(conn, prefix, cfg.kafka.group_id, cfg.dlq_topic(), cfg.alerts.alert_topic)
            built.callback(txn.close)
        if cfg.alerts.alert_topic and txn is None:
            from kafka import KafkaProducer
            from kafka.errors import KafkaError

            try:
                alert_producer = KafkaProducer(**conn.kafka_kwargs(), acks="all")
            except (KafkaError, OSError) as exc:
                raise KafkaUnavailableError(f"alert producer: {connect_error(conn, exc)}") from exc
            built.callback(alert_producer.close)
            alert_sinks.append(KafkaAlertSink(alert_producer, cfg.alerts.alert_topic, resend=resend_failed))
        built.pop_all()  # every part built: the job closes them
    settings = ConsumerSettings(
        topics=tuple(cfg.kafka.topics), group_id=cfg.kafka.group_id,
        auto_offset_reset=cfg.kafka.auto_offset_reset, max_poll_records=cfg.kafka.max_poll_records,
        max_poll_interval_ms=cfg.kafka.max_poll_interval_ms, session_timeout_ms=cfg.kafka.session_timeout_ms,
        group_instance_id=cfg.kafka.group_instance_id,
    )
    return Parts(engine, conn, settings, decode, registry, dlq, alert_sinks, alert_producer, txn)
