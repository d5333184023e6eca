"""Typed configuration: one model per concern, combined into the job configs.

Precedence, highest first: CLI flags, ``NLPSTREAM_`` environment variables
(nested with ``__``, e.g. ``NLPSTREAM_KAFKA__BOOTSTRAP_SERVERS``), the YAML
file given with ``--config``, then the defaults below. Secrets are
``SecretStr``: never printed, logged or exported as metrics; they can also
come from files (``NLPSTREAM_KAFKA__SASL_PASSWORD_FILE``).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict


class ConfigError(Exception):
    """The configuration is invalid; the message names the fields and values."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KafkaConfig(_Section):
    """Kafka connection and consumption."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list.")
    topics: list[str] = Field(default_factory=list, description="Topics to consume (at least one for stream).")
    group_id: str = Field("nlpstream", description="Consumer group id; offsets are committed under it.")
    group_instance_id: str | None = Field(
        None, description="Static membership id (e.g. the pod name): a restart with the same id skips the rebalance.")
    auto_offset_reset: Literal["earliest", "latest"] = Field("earliest", description="Where a new group starts.")
    dlq_topic: str | None = Field(None, description="Dead-letter topic; default '<first topic>.dlq'.")
    max_poll_records: int = Field(512, ge=1, description="Most records handled per micro-batch.")
    max_poll_interval_ms: int = Field(300_000, ge=1000, description="Group eviction if no poll in this time.")
    session_timeout_ms: int = Field(45_000, ge=1000, description="Group session timeout.")
    fetch_stall_timeout: float = Field(120.0, gt=0, description=(
        "Seconds an assigned partition may hold unread records without giving one before the consumer "
        "is rebuilt (guards against client-side fetch stalls)."))
    startup_timeout: float = Field(120.0, ge=0, description=(
        "Seconds to wait for the brokers at start-up (retried with backoff) before giving up; 0: one try."))
    transactions: bool = Field(False, description=(
        "Exactly-once dead letters and Kafka alerts: each input partition's dead letters, alert records and "
        "committed offset go in one Kafka transaction after its files or table commit are durable "
        "(read them with isolation_level=read_committed). Off: at-least-once (a crash may repeat some)."))
    client: Literal["kafka-python", "confluent"] = Field("kafka-python", description=(
        "The stream job's consumer: kafka-python (default), or confluent-kafka (librdkafka parses records "
        "in C; needs the confluent extra; not with kafka.transactions)."))
    transactional_id_prefix: str | None = Field(None, description=(
        "Prefix of the transactional ids (<prefix>-<topic>-<partition>); default 'nlpstream-<group_id>'. "
        "Workers of one group must share it; different groups must not."))
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = Field(None, description="SASL password (secret).")
    sasl_password_file: Path | None = Field(None, description="Read the SASL password from this file.")
    ssl_cafile: str | None = Field(None, description="PEM CA bundle the brokers' certificates are checked against.")
    ssl_certfile: str | None = Field(None, description="PEM client certificate (mutual TLS).")
    ssl_keyfile: str | None = Field(None, description="PEM client private key (mutual TLS).")
    ssl_password: SecretStr | None = Field(None, description="Password of an encrypted ssl_keyfile (secret).")
    ssl_password_file: Path | None = Field(None, description="Read the ssl_keyfile password from this file.")

    @field_validator("topics", mode="before")
    @classmethod
    def _split_topics(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    def password(self) -> str | None:
        """The SASL password from the value or the file (never logged)."""
        return _secret(self.sasl_password, self.sasl_password_file)

    def key_password(self) -> str | None:
        """The password of the TLS client key from the value or the file (never logged)."""
        return _secret(self.ssl_password, self.ssl_password_file)


def _secret(value: SecretStr | None, file: Path | None) -> str | None:
    if value is not None:
        return value.get_secret_value()
    if file is not None:
        return file.read_text().strip()
    return None


class SchemaRegistryConfig(_Section):
    """The Schema Registry of the schema'd input formats (any server with the Confluent API)."""

    url: str | None = Field(None, description="Base URL of the Confluent-compatible API, e.g. http://host:8081 "
                            "or Apicurio's http://host:8080/apis/ccompat/v7.")
    username: str | None = Field(None, description="HTTP basic-auth user.")
    password: SecretStr | None = Field(None, description="HTTP basic-auth password (secret).")
    password_file: Path | None = Field(None, description="Read the basic-auth password from this file.")
    ca_file: str | None = Field(None, description="PEM CA bundle the registry's TLS certificate is checked against.")
    retry_max_s: float = Field(30.0, gt=0, description="Longest wait between tries while the registry is down.")

    def secret(self) -> str | None:
        """The basic-auth password from the value or the file (never logged)."""
        return _secret(self.password, self.password_file)


class InputConfig(_Section):
    """How record values are decoded."""

    input_format: Literal["text", "json", "avro", "json-schema", "protobuf"] = Field(
        "json", description="Plain UTF-8 text, a JSON object, or Avro / JSON Schema / Protobuf records in the "
        "Confluent wire format (schemas from input.schema_registry).")
    text_field: str = Field("text", description="Field holding the text; a dotted path reaches into nested "
                            "objects (body.text).")
    id_field: str = Field("id", description="Field holding the message id (dotted paths too).")
    schema_registry: SchemaRegistryConfig = Field(default_factory=SchemaRegistryConfig)

    @model_validator(mode="after")
    def _registry_needed(self) -> "InputConfig":
        if self.input_format in ("avro", "json-schema", "protobuf") and not self.schema_registry.url:
            raise ValueError(f"input_format {self.input_format!r} needs input.schema_registry.url "
                             "(--schema-registry-url or NLPSTREAM_INPUT__SCHEMA_REGISTRY__URL)")
        if self.schema_registry.password is not None and self.schema_registry.password_file is not None:
            raise ValueError("set input.schema_registry.password or password_file, not both")
        sr = self.schema_registry
        if (sr.password is not None or sr.password_file is not None) and not sr.username:
            raise ValueError("input.schema_registry.password needs input.schema_registry.username")
        if sr.username and ":" in sr.username:
            raise ValueError("input.schema_registry.username must not contain ':' (HTTP basic auth)")
        return self


class ModelConfig(_Section):
    """Which model runs where."""

    model: str = Field("builtin:sentiment", description="builtin:sentiment, a local HF directory or a cached hub id.")
    devices: str = Field("auto", description="auto, cpu, cpu:N, cuda, cuda:0,cuda:1.")
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto", description="auto: int8 (OpenVINO, fp32 agreement guard) on CPU, bf16 on GPU.")
    max_batch_tokens: int | None = Field(None, ge=1, description="Padded tokens per device batch (default 2048 CPU, 65536 GPU).")
    max_batch_size: int | None = Field(None, ge=1, description="Texts per device batch (default 32 CPU, 1024 GPU).")
    long_text: Literal["truncate", "chunk"] = Field("truncate", description="Long texts: keep the first tokens, or average overlapping windows.")
    cache_entries: int = Field(100_000, ge=0, description="Dedup cache entries (0 disables).")
    target_latency_ms: float | None = Field(None, gt=0, description="Adapt the token budget to keep batches under this latency.")
    min_agreement: float = Field(0.9, ge=0, le=1, description="Start-up check: least share of a fixed sample whose label "
                                 "on each replica that does not run fp32 equals fp32's (0 turns it off).")

    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`inference.load_engine`."""
        return {"model": self.model, "devices": self.devices, "precision": self.precision,
                "max_batch_tokens": self.max_batch_tokens, "max_batch_size": self.max_batch_size,
                "long_text": self.long_text, "cache_entries": self.cache_entries,
                "target_latency_ms": self.target_latency_ms, "min_agreement": self.min_agreement}


_SECRET_KEY = re.compile(r"(token|secret|password|credential|key)", re.IGNORECASE)


class IcebergConfig(_Section):
    """The Iceberg catalog and table (``output.format: iceberg``)."""

    catalog: dict[str, Any] = Field(default_factory=dict, description=(
        "Properties given to pyiceberg's load_catalog, e.g. {type: sql, uri: 'sqlite:///cat.db', "
        "warehouse: 'file:///wh'} or a REST catalog; 'name' (default 'default') names the catalog."))
    table: str | None = Field(None, description="'namespace.table', created (partitioned by topic and date) when missing.")


class OutputConfig(_Section):
    """Where and how rows are written: Parquet files, a Delta Lake table or an Iceberg table."""

    output: str = Field("./nlpstream-output", description=(
        "Output folder or fsspec URL (s3://bucket/prefix, ...); the table location for delta."))
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False, description=(
        "Passed to the fsspec file system of an object-store URL, e.g. {key, secret, endpoint_url, "
        "client_kwargs: {region_name}} for s3://. Every value is a secret: masked in redacted(), never logged, "
        "not in error messages. Empty: the standard AWS environment (AWS_ACCESS_KEY_ID, ...)."))
    format: Literal["parquet", "delta", "iceberg"] = Field("parquet", description=(
        "parquet: hive folders of files; delta: a Delta Lake table at 'output'; iceberg: the table in 'iceberg'."))
    iceberg: IcebergConfig = Field(default_factory=IcebergConfig)

    @model_validator(mode="after")
    def _check_format(self) -> "OutputConfig":
        if self.format == "iceberg" and (not self.iceberg.table or not self.iceberg.catalog):
            raise ValueError("output.format iceberg needs output.iceberg.catalog (pyiceberg catalog properties) "
                             "and output.iceberg.table ('namespace.table')")
        if self.format == "iceberg" and "." not in (self.iceberg.table or ""):
            raise ValueError(f"output.iceberg.table {self.iceberg.table!r} must be 'namespace.table'")
        return self
    include_text: bool = Field(True, description="Write the text column.")
    flush_interval: float = Field(10.0, gt=0, description="Seconds between file flushes (and commits).")
    max_buffered_rows: int = Field(50_000, ge=1, description="Flush early when this many rows are buffered.")
    background_flush: bool = Field(True, description=(
        "Write files, dead letters and alerts on a writer thread beside the loop (which goes on consuming and "
        "classifying); offsets are committed only once that flush is durable. Off: the loop waits for each flush. "
        "Flushes are always on the loop with kafka.transactions."))
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    skip_written: bool = Field(True, description=(
        "Before each file, list the partition's files of that date and skip offsets another worker already "
        "wrote (guards against an evicted zombie worker; costs one listing per file)."))


class AlertConfig(_Section):
    """Alert rules and where alerts go."""

    alert_topic: str | None = Field(None, description="Kafka topic for alerts.")
    alert_file: str | None = Field(None, description="JSONL file alerts are appended to.")
    alert_webhook_url: str | None = Field(None, description="HTTP(S) endpoint each alert is POSTed to as JSON.")
    alert_webhook_token: SecretStr | None = Field(None, description="Bearer token for the webhook (secret).")
    message_label: str = Field("negative", description="Label the rules watch.")
    message_head: str | None = Field(None, description="Head whose label the rules watch (multi-head models); default: the first head.")
    where: dict[str, str] = Field(default_factory=dict, description="Only messages whose heads have these labels count, e.g. {topic: billing}.")
    message_min_score: float | None = Field(0.97, ge=0, le=1, description="Alert on one message at/above this score; null disables.")
    window_key_field: str | None = Field(None, description="JSON field(s) to group by, first present wins (e.g. 'customer,ticker'); null disables.")
    window_seconds: float = Field(300.0, gt=0, description="Sliding window length in event time.")
    window_min_count: int = Field(5, ge=1, description="Messages needed in the window before the share counts.")
    window_share: float = Field(0.6, gt=0, le=1, description="Share of watched labels that fires the window rule.")


class MetricsConfig(_Section):
    """The Prometheus endpoint."""

    metrics_port: int | None = Field(9108, ge=0, le=65535, description="Port of /metrics; null disables, 0 picks one.")
    metrics_host: str = Field("127.0.0.1", description="Bind address of /metrics.")


class _BaseJobConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NLPSTREAM_", env_nested_delimiter="__", extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    gc_tuning: bool = Field(True, description=(
        "While the stream job, a backfill or a Ray backfill actor runs (not Spark tasks): freeze what start-up "
        "loaded (the model, libraries) out of the garbage collector's scans and collect the youngest generation "
        "every 10,000 allocations instead of 700 (per-message and per-result objects made it a large share of "
        "the host path)."))

    def redacted(self) -> dict[str, Any]:
        """The configuration as JSON-able data with secrets masked (every output.storage_options value, and
        catalog properties that look like credentials)."""
        data = self.model_dump(mode="json")
        data["output"]["storage_options"] = _masked(data["output"].get("storage_options") or {})
        catalog = data["output"].get("iceberg", {}).get("catalog", {})
        for key in catalog:
            if _SECRET_KEY.search(key):
                catalog[key] = "**********"
        return data


def _masked(value: Any) -> Any:
    """``value`` with every leaf replaced by '**********' (keys, and the nesting, stay readable)."""
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return "**********"


class StreamConfig(_BaseJobConfig):
    """Everything ``nlpstream stream`` needs."""

    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    alerts: AlertConfig = Field(default_factory=AlertConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    max_messages: int | None = Field(None, ge=1, description=(
        "Stop after this many input messages consumed (demo, tests); a message redelivered after a rebalance "
        "counts again."))
    idle_timeout: float | None = Field(None, gt=0, description=(
        "Stop after this many seconds with no input, once the brokers' end offsets show every assigned partition "
        "read to its end."))
    stall_timeout: float = Field(300.0, ge=30, description=(
        "Liveness: when one loop round takes longer, dump every thread's stack and exit with code 75 "
        "so the supervisor restarts the worker (safe: output resumes from the files). At least 30 s: while "
        "the brokers are away one healthy round may wait on several bounded broker reads (about 20 s)."))
    workers: int = Field(1, ge=1, le=64, description=(
        "Worker processes of the consumer group under one supervisor (nlpstream stream): one per GPU, "
        "an explicit model.devices list dealt out among them; failed workers are restarted, and one /metrics "
        "serves every worker's series with a worker label. max_messages and idle_timeout count per worker."))
    pipeline_depth: int = Field(1, ge=0, le=8, description=(
        "Micro-batches classified ahead on a worker thread while the loop polls, decodes and writes "
        "(0: one batch at a time). Commits still wait until the rows are durable."))

    @model_validator(mode="after")
    def _check(self) -> "StreamConfig":
        if self.kafka.dlq_topic is not None and self.kafka.dlq_topic in self.kafka.topics:
            raise ValueError(f"kafka.dlq_topic ({self.kafka.dlq_topic!r}) must differ from kafka.topics ({self.kafka.topics})")
        if self.alerts.alert_topic is not None and self.alerts.alert_topic in self.kafka.topics:
            raise ValueError(f"alerts.alert_topic ({self.alerts.alert_topic!r}) must differ from kafka.topics ({self.kafka.topics})")
        for name in ("sasl_password", "ssl_password"):
            if getattr(self.kafka, name) is not None and getattr(self.kafka, f"{name}_file") is not None:
                raise ValueError(f"set kafka.{name} or kafka.{name}_file, not both")
        if self.kafka.client == "confluent":
            if self.kafka.transactions:
                raise ValueError("kafka.client 'confluent' does not support kafka.transactions (the transactional "
                                 "producer commits offsets for a kafka-python consumer's group): use kafka-python")
            if importlib.util.find_spec("confluent_kafka") is None:
                raise ValueError("kafka.client 'confluent' needs the confluent-kafka package: "
                                 "pip install 'nlpstream[confluent]'")
        return self

    def dlq_topic(self) -> str:
        return self.kafka.dlq_topic or f"{self.kafka.topics[0]}.dlq"


class BackfillConfig(_BaseJobConfig):
    """Everything ``nlpstream backfill`` needs."""

    text_field: str = Field("text", description="Column / field holding the text.")
    id_field: str = Field("id", description="Column / field holding the id (row number when absent).")
    topic_name: str | None = Field(None, description="Hive 'topic' folder key of the output; default: each input's file stem.")
    rows_per_file: int = Field(10_000, ge=1, description=(
        "Input rows (or Kafka records) per piece: the unit that is labeled, written (one file per date in it), "
        "resumed after a crash and handed to a Ray actor. Keep it the same between a run and its rerun."))
    read_block_bytes: int = Field(8 << 20, ge=1 << 16, description=(
        "Bytes per block of the JSON and CSV streaming readers (Parquet is read a row group at a time)."))
    kafka: KafkaConfig = Field(default_factory=KafkaConfig, description=(
        "Kafka replay (--kafka-topic): brokers, security and the dead-letter topic (default '<topic>.dlq'); "
        "group_id is not used: the replay assigns partitions itself and never commits."))
    input: InputConfig = Field(default_factory=InputConfig, description=(
        "Kafka replay: how record values are decoded (input_format, schema_registry); the text and id fields "
        "are text_field and id_field above."))
    metrics: MetricsConfig = Field(default_factory=lambda: MetricsConfig(metrics_port=None), description=(
        "/metrics while the backfill runs (off unless a port is given)."))

    def dlq_topic(self) -> str:
        """The dead-letter topic of the Kafka replay."""
        return self.kafka.dlq_topic or f"{self.kafka.topics[0]}.dlq"


def _deep_set(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        target = target.setdefault(key, {})
    target[leaf] = value


def load_config(cls: type[_BaseJobConfig], config_file: Path | None, overrides: dict[str, Any]) -> Any:
    """Build ``cls`` from YAML < env < ``overrides`` (dotted keys; None values are ignored).

    Raises ConfigError with the field names and values when anything is invalid.
    """
    from pydantic import ValidationError

    file_data: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping at the top level")
        file_data = loaded
    cli: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is not None and value != []:
            _deep_set(cli, dotted, value)

    class _WithFile(cls):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(
            cls_,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, InitSettingsSource(settings_cls, file_data))

    try:
        merged = _WithFile(**cli)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from exc
    return cls.model_construct(**{name: getattr(merged, name) for name in cls.model_fields})


def _explain(exc: Any) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        value = err.get("input")
        if isinstance(value, (dict, list)) or value is None:
            lines.append(f"{where}: {err['msg']}")
            continue
        shown = "<secret>" if "password" in where or "storage_options" in where else repr(value)[:80]
        lines.append(f"{where}: {err['msg']} (got {shown})")
    return "invalid configuration:\n  " + "\n  ".join(lines)
