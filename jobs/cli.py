"""The ``nlpstream`` command line: stream, backfill, classify, train-head, demo, kafka-local, bench."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from nlpstream.jobs.config import BackfillConfig, ConfigError, StreamConfig, load_config

app = typer.Typer(help="Label Kafka text streams with Transformer classifiers.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
kafka_app = typer.Typer(help="A real local Apache Kafka broker (KRaft) for development and tests.", no_args_is_help=True)
app.add_typer(kafka_app, name="kafka-local")
registry_app = typer.Typer(help="A real local Schema Registry (Apicurio, Confluent-compatible API) for development and tests.",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry-local")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML config file (sections: kafka, input, model, output, alerts, metrics).")]
ModelOpt = Annotated[Optional[str], typer.Option(help="builtin:sentiment, a local Hugging Face directory, a cached hub id, "
                                                "or heads separated by commas (builtin:sentiment,builtin:topic,DIR).")]
DevicesOpt = Annotated[Optional[str], typer.Option(help="auto, cpu, cpu:N, cuda, cuda:0,cuda:1.")]
PrecisionOpt = Annotated[Optional[str], typer.Option(help="auto, fp32, bf16 or fp16.")]


def _setup_logging(verbose: bool) -> None:
    worker = os.environ.get("NLPSTREAM_WORKER")  # a worker of nlpstream stream --workers N: its index
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s " + (f"worker {worker} " if worker else "")
                        + "%(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    for name in ("httpx", "httpx2"):  # the registry client's per-request INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)
    # object-store clients log request headers and credential lookups at DEBUG: never with -v
    for name in ("botocore", "aiobotocore", "boto3", "s3fs", "gcsfs", "adlfs", "azure", "urllib3", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _model_error(exc: Exception) -> None:
    """A model, device or precision mistake (or an engine that cannot start): one line, exit 1."""
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1) from None


def _preflight(model: str, devices: str, precision: str) -> None:
    """Check the model, device and precision choice before anything heavy is loaded."""
    from nlpstream.inference import InferenceError
    from nlpstream.inference.preflight import check_engine_options

    try:
        check_engine_options(model, devices, precision)
    except InferenceError as exc:
        _model_error(exc)


@app.command()
def stream(
    config: ConfigOpt = None,
    bootstrap_servers: Annotated[Optional[str], typer.Option(help="Kafka bootstrap servers host:port[,host:port].")] = None,
    topic: Annotated[Optional[list[str]], typer.Option("--topic", help="Topic to consume (repeatable).")] = None,
    group_id: Annotated[Optional[str], typer.Option(help="Consumer group id.")] = None,
    kafka_client: Annotated[Optional[str], typer.Option(help="Consumer client: kafka-python (default) or confluent (librdkafka; the confluent extra).")] = None,
    input_format: Annotated[Optional[str], typer.Option(help="text, json, or avro / json-schema / protobuf (Confluent wire format).")] = None,
    schema_registry_url: Annotated[Optional[str], typer.Option(help="Schema Registry (Confluent-compatible API) of the schema'd formats.")] = None,
    text_field: Annotated[Optional[str], typer.Option(help="Field with the text; dotted path into nested objects (body.text).")] = None,
    id_field: Annotated[Optional[str], typer.Option(help="Field with the id (dotted path too).")] = None,
    model: ModelOpt = None,
    devices: DevicesOpt = None,
    precision: PrecisionOpt = None,
    output: Annotated[Optional[str], typer.Option(help="Output folder or fsspec URL (the table location with --output-format delta).")] = None,
    output_format: Annotated[Optional[str], typer.Option(help="parquet (default), delta, or iceberg (catalog and table in --config).")] = None,
    no_text: Annotated[Optional[bool], typer.Option("--no-text", help="Leave the text column out.")] = None,
    flush_interval: Annotated[Optional[float], typer.Option(help="Seconds between file flushes and commits.")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Port of /metrics (0 picks a free one).")] = None,
    metrics_host: Annotated[Optional[str], typer.Option(help="Bind address of /metrics.")] = None,
    dlq_topic: Annotated[Optional[str], typer.Option(help="Dead-letter topic (default <topic>.dlq).")] = None,
    alert_topic: Annotated[Optional[str], typer.Option(help="Kafka topic for alerts.")] = None,
    alert_file: Annotated[Optional[str], typer.Option(help="JSONL file for alerts.")] = None,
    alert_webhook_url: Annotated[Optional[str], typer.Option(help="HTTP(S) endpoint alerts are POSTed to.")] = None,
    alert_key_field: Annotated[Optional[str], typer.Option(help="JSON field for the per-key window rule.")] = None,
    max_messages: Annotated[Optional[int], typer.Option(help="Stop after this many messages.")] = None,
    idle_timeout: Annotated[Optional[float], typer.Option(help="Stop after this many idle seconds.")] = None,
    workers: Annotated[Optional[int], typer.Option(help=(
        "Worker processes of the group under one supervisor (one per GPU; an explicit --devices list is dealt "
        "out among them); failed ones are restarted, one /metrics serves them all."))] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Consume topics, classify, write Parquet and alerts, commit after files are durable.

    SIGTERM/SIGINT: stop polling, finish the batch in hand, flush, commit, exit 0 (with --workers: every
    worker does, then the supervisor exits).
    """
    _setup_logging(verbose)
    overrides = {
        "kafka.bootstrap_servers": bootstrap_servers, "kafka.topics": topic, "kafka.group_id": group_id,
        "kafka.client": kafka_client,
        "kafka.dlq_topic": dlq_topic, "input.input_format": input_format, "input.text_field": text_field,
        "input.schema_registry.url": schema_registry_url,
        "input.id_field": id_field, "model.model": model, "model.devices": devices, "model.precision": precision,
        "output.output": output, "output.format": output_format, "output.include_text": False if no_text else None,
        "output.flush_interval": flush_interval, "metrics.metrics_port": metrics_port,
        "metrics.metrics_host": metrics_host, "alerts.alert_topic": alert_topic, "alerts.alert_file": alert_file,
        "alerts.alert_webhook_url": alert_webhook_url,
        "alerts.window_key_field": alert_key_field, "max_messages": max_messages, "idle_timeout": idle_timeout,
        "workers": workers,
    }
    cfg = _stream_config(config, overrides)
    if cfg.workers > 1:
        from nlpstream.jobs.metrics import MetricsPortError
        from nlpstream.jobs.supervisor import supervise, worker_devices

        devices = worker_devices(cfg.model.devices, cfg.workers)
        for each in sorted(set(devices)):  # fail once, not once a worker
            _preflight(cfg.model.model, each, cfg.model.precision)
        try:
            code = supervise(cfg, config, overrides, devices, verbose)
        except MetricsPortError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        raise typer.Exit(code)
    _run_stream(cfg)


@app.command("stream-worker", hidden=True)
def stream_worker(
    config: ConfigOpt = None,
    overrides: Annotated[str, typer.Option(help="The dotted overrides, as JSON.")] = "{}",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """One worker of ``nlpstream stream --workers N``, started by its supervisor (jobs/supervisor.py)."""
    from nlpstream.jobs.supervisor import set_parent_death_signal

    set_parent_death_signal()
    _setup_logging(verbose)
    _run_stream(_stream_config(config, {**json.loads(overrides), "workers": 1}))


def _stream_config(config: Optional[Path], overrides: dict[str, object]) -> StreamConfig:
    try:
        cfg = load_config(StreamConfig, config, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    if not cfg.kafka.topics:
        _fail("no topic: give --topic, kafka.topics in --config, or NLPSTREAM_KAFKA__TOPICS")
    return cfg  # type: ignore[no-any-return]


def _run_stream(cfg: StreamConfig) -> None:
    """Run one stream job in this process until it stops; exit codes as ``nlpstream stream`` documents."""
    from nlpstream.consumers.errors import ConsumerError
    from nlpstream.jobs.metrics import MetricsPortError
    from nlpstream.inference import InferenceError, NoLiveDeviceError
    from nlpstream.jobs.stream import DEVICE_EXIT_CODE, StreamJob
    from nlpstream.sinks import SinkError

    job = StreamJob(cfg, hard_backstop=True)  # run() checks output, model, devices and precision first
    signal.signal(signal.SIGTERM, lambda *_: job.stop())
    signal.signal(signal.SIGINT, lambda *_: job.stop())
    try:
        summary = job.run()
    except (ConsumerError, MetricsPortError, SinkError, ConfigError) as exc:  # brokers unreachable, port taken, output unusable, alerts naming an unknown head
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except NoLiveDeviceError as exc:  # devices stopped answering while running: restart me
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(DEVICE_EXIT_CODE) from None
    except InferenceError as exc:  # at start-up: model, device spec, precision or fp32 agreement; a restart won't help
        _model_error(exc)
    logging.getLogger("nlpstream").info(
        "stopped: consumed=%d labeled=%d dead_lettered=%d skipped=%d alerts=%d files=%d",
        summary.consumed, summary.labeled, summary.dead_lettered, summary.skipped, summary.alerts, len(summary.files),
    )


@app.command()
def backfill(
    input: Annotated[Optional[list[str]], typer.Option(
        "--input", help="File, folder, glob or fsspec URL (s3://bucket/prefix/*.parquet) of JSONL, CSV or Parquet "
        "(repeatable).")] = None,
    output: Annotated[Optional[str], typer.Option(help="Output folder or fsspec URL.")] = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    devices: DevicesOpt = None,
    precision: PrecisionOpt = None,
    text_field: Annotated[Optional[str], typer.Option(help="Column (or JSON field) with the text.")] = None,
    id_field: Annotated[Optional[str], typer.Option(help="Column (or JSON field) with the id.")] = None,
    topic_name: Annotated[Optional[str], typer.Option(help="Hive 'topic' key of the output (file inputs).")] = None,
    no_text: Annotated[Optional[bool], typer.Option("--no-text", help="Leave the text column out.")] = None,
    rows_per_file: Annotated[Optional[int], typer.Option(
        help="Rows (or records) per piece: labeled, written and resumed as one unit.")] = None,
    kafka_topic: Annotated[Optional[str], typer.Option(help="Replay this Kafka topic instead of files.")] = None,
    bootstrap_servers: Annotated[Optional[str], typer.Option(help="Kafka bootstrap servers host:port[,host:port].")] = None,
    from_time: Annotated[Optional[str], typer.Option(help="Replay records with timestamps at or after this ISO-8601 time.")] = None,
    to_time: Annotated[Optional[str], typer.Option(help="Replay records with timestamps before this ISO-8601 time.")] = None,
    input_format: Annotated[Optional[str], typer.Option(help="Kafka replay: text, json, avro, json-schema or protobuf.")] = None,
    schema_registry_url: Annotated[Optional[str], typer.Option(help="Kafka replay: Schema Registry of the schema'd formats.")] = None,
    dlq_topic: Annotated[Optional[str], typer.Option(help="Kafka replay: dead-letter topic (default <topic>.dlq).")] = None,
    executor: Annotated[str, typer.Option(help="local (this process) or ray (Ray Data; file inputs).")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="Join this Ray cluster (default: start a local one).")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Serve /metrics on this port while running (0 picks one).")] = None,
    metrics_host: Annotated[Optional[str], typer.Option(help="Bind address of /metrics.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Re-label files or a Kafka time range into the stream job's output schema, with a progress bar.

    A rerun after a crash skips finished pieces; rows without usable text go to <output>/_rejects/.
    """
    _setup_logging(verbose)
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)
    from nlpstream.jobs.backfill_cli import run_backfill_command

    try:
        cfg = load_config(BackfillConfig, config, {
            "output.output": output, "model.model": model, "model.devices": devices, "model.precision": precision,
            "text_field": text_field, "id_field": id_field, "topic_name": topic_name,
            "output.include_text": False if no_text else None, "rows_per_file": rows_per_file,
            "kafka.bootstrap_servers": bootstrap_servers, "kafka.topics": [kafka_topic] if kafka_topic else None,
            "kafka.dlq_topic": dlq_topic, "input.input_format": input_format,
            "input.schema_registry.url": schema_registry_url,
            "metrics.metrics_port": metrics_port, "metrics.metrics_host": metrics_host,
        })
    except ConfigError as exc:
        _fail(str(exc))
    if not input and not kafka_topic:
        _fail("nothing to backfill: give --input (files) or --kafka-topic")
    if input and kafka_topic:
        _fail("give --input or --kafka-topic, not both")
    if executor not in ("local", "ray"):
        _fail(f"--executor {executor!r}: expected local or ray")
    if kafka_topic and executor != "local":
        _fail("--kafka-topic runs with --executor local (the Ray executor reads files)")
    code = run_backfill_command(cfg, list(input or []), kafka_topic, from_time, to_time, executor, ray_address)
    if code:
        raise typer.Exit(code)


@app.command()
def classify(
    file: Annotated[Optional[Path], typer.Argument(help="Text file, one text per line (default: stdin).")] = None,
    model: ModelOpt = None,
    devices: DevicesOpt = None,
    precision: PrecisionOpt = None,
    probs: Annotated[bool, typer.Option(help="Include per-label probabilities.")] = False,
) -> None:
    """Label lines from a file or stdin and print JSON lines."""
    from nlpstream.inference import InferenceError, load_engine

    spec = (model or "builtin:sentiment", devices or "auto", precision or "auto")
    _preflight(*spec)
    source = file.open(encoding="utf-8") if file else sys.stdin
    lines = [line.rstrip("\n") for line in source]
    texts = [t for t in lines if t.strip()]
    try:
        engine = load_engine(*spec)
    except InferenceError as exc:
        _model_error(exc)
    with engine:
        preds = engine.classify_each(texts)
    for text, pred in zip(texts, preds):
        if isinstance(pred, Exception):  # the model fails on this text alone: say so on its line
            typer.echo(json.dumps({"text": text, "error": str(pred)}, ensure_ascii=False))
            continue
        out = {"text": text, "label": pred.label, "score": round(pred.score, 6)}
        if probs:
            out["probs"] = {k: round(v, 6) for k, v in pred.probs.items()}
        if pred.heads:
            out["heads"] = {name: {"label": h.label, "score": round(h.score, 6),
                                   **({"probs": {k: round(v, 6) for k, v in h.probs.items()}} if probs else {})}
                            for name, h in pred.heads.items()}
        typer.echo(json.dumps(out, ensure_ascii=False))


@app.command("train-head")
def train_head(
    data: Annotated[Path, typer.Option("--data", help="Labeled texts: JSONL, CSV or Parquet.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the head into (head.json, head.safetensors, MODEL_CARD.md).")],
    text_field: Annotated[str, typer.Option(help="Column with the text.")] = "text",
    label_field: Annotated[str, typer.Option(help="Column with the label (any strings).")] = "label",
    name: Annotated[Optional[str], typer.Option(help="Head name: its output columns are <name>_label and <name>_score (default: the folder name).")] = None,
    heldout: Annotated[float, typer.Option(help="Share of each label held out for the reported figures.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split and the fit (same seed, same bytes on one machine).")] = 13,
) -> None:
    """Train a classification head on your labeled texts over the packaged backbone (CPU, deterministic)."""
    from nlpstream.inference import ModelLoadError
    from nlpstream.inference.heads import HeadTrainingError, read_labeled
    from nlpstream.inference.heads import train_head as train

    head_name = name or out.resolve().name.lower().replace("-", "_")
    started = time.monotonic()
    try:
        texts, labels = read_labeled(data, text_field, label_field)
        spec = train(texts, labels, out, head_name, seed=seed, heldout=heldout, source=data.name)
    except (HeadTrainingError, ModelLoadError) as exc:  # bad data or options: one line, exit 1
        _model_error(exc)
    held = spec["heldout"]
    typer.echo(f"trained head {spec['name']!r} on {spec['train_size']} rows ({len(spec['labels'])} labels) "
               f"in {time.monotonic() - started:.1f}s; held out {held['n']} rows:")
    typer.echo(f"  accuracy {held['accuracy']:.3f}   calibration error (ECE, 10 bins) {held['ece_uncalibrated']:.3f} "
               f"-> {held['ece']:.3f} with temperature {spec['temperature']:.3f}")
    for label in spec["labels"]:
        typer.echo(f"  F1 {label}: {held['f1'][label]:.3f}")
    typer.echo(f"wrote {out}/head.json, head.safetensors, MODEL_CARD.md; use it with --model builtin:sentiment,{out}")


@app.command()
def compact(
    output: Annotated[Optional[str], typer.Option(help="Output folder, or the table location with --output-format delta.")] = None,
    output_format: Annotated[Optional[str], typer.Option(help="parquet (default), delta, or iceberg (catalog and table in --config).")] = None,
    config: ConfigOpt = None,
    date: Annotated[Optional[list[str]], typer.Option("--date", help="UTC day YYYY-MM-DD to compact (repeatable); default: every day before today.")] = None,
    topic: Annotated[Optional[str], typer.Option(help="Only this topic.")] = None,
    target_rows: Annotated[int, typer.Option(help="Parquet folders: rows per merged file at most.")] = 1_000_000,
) -> None:
    """Merge small files into larger ones (Parquet folders, Delta and Iceberg tables), never showing readers a row twice."""
    from datetime import datetime, timezone

    from nlpstream.sinks import SinkError
    from nlpstream.sinks.compact import compact_delta, compact_iceberg, compact_parquet

    try:
        cfg = load_config(StreamConfig, config, {"output.output": output, "output.format": output_format})
    except ConfigError as exc:
        _fail(str(exc))
    out = cfg.output
    dates = list(date or [])
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    try:
        if out.format == "delta":
            result = compact_delta(out.output, dates or None, topic)
        elif out.format == "iceberg":
            result = compact_iceberg(out.iceberg.catalog, out.iceberg.table or "", dates or None, topic)
        else:
            result = compact_parquet(out.output, dates or None, topic, target_rows, before=None if dates else today)
    except (SinkError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - table library errors: one line
        typer.echo(f"error: cannot compact {out.format} output: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps({"format": out.format, "compacted": result.partitions, "files_before": result.files_before,
                           "files_after": result.files_after, "rows": result.rows}))


@app.command()
def demo(
    messages: Annotated[int, typer.Option(help="Messages to produce.")] = 600,
    output: Annotated[Path, typer.Option(help="Where output is left.")] = Path("nlpstream-demo-output"),
    data_dir: Annotated[Optional[Path], typer.Option(help="Broker data folder (default in the cache).")] = None,
    keep_broker: Annotated[bool, typer.Option(help="Leave the local broker running.")] = False,
    devices: DevicesOpt = None,
) -> None:
    """Start a local broker, produce sample traffic, run the stream job, print a summary."""
    _setup_logging(False)
    logging.getLogger().setLevel(logging.WARNING)
    from nlpstream.jobs.demo import run_demo

    _preflight("builtin:sentiment", devices or "auto", "auto")
    run_demo(messages=messages, output=output, data_dir=data_dir, keep_broker=keep_broker, devices=devices or "auto")


@kafka_app.command("start")
def kafka_start(
    port: Annotated[int, typer.Option(help="Broker port (0 picks a free one).")] = 9092,
    data_dir: Annotated[Path, typer.Option(help="Data folder (logs, pid, config).")] = Path(".nlpstream-kafka"),
    version: Annotated[str, typer.Option(help="Apache Kafka version (4.x).")] = "",
) -> None:
    """Start a single-node KRaft broker in the background; returns once it accepts clients."""
    from nlpstream.consumers import KafkaLocalError
    from nlpstream.consumers.kafka_local import DEFAULT_KAFKA_VERSION, start

    try:
        info = start(data_dir, port=port, version=version or DEFAULT_KAFKA_VERSION)
    except KafkaLocalError as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"bootstrap_servers": info.bootstrap_servers, "pid": info.pid, "data_dir": info.data_dir}))


@kafka_app.command("stop")
def kafka_stop(data_dir: Annotated[Path, typer.Option(help="Data folder given to start.")] = Path(".nlpstream-kafka")) -> None:
    """Stop the broker started with this data folder."""
    from nlpstream.consumers.kafka_local import stop

    typer.echo("stopped" if stop(data_dir) else "not running")


@kafka_app.command("status")
def kafka_status(data_dir: Annotated[Path, typer.Option(help="Data folder given to start.")] = Path(".nlpstream-kafka")) -> None:
    """Report whether the broker of this data folder runs; exit 1 when it does not."""
    from nlpstream.consumers.kafka_local import status

    info, running = status(data_dir)
    typer.echo(json.dumps({"running": running, "bootstrap_servers": info.bootstrap_servers if info else None,
                           "pid": info.pid if info else None}))
    if not running:
        raise typer.Exit(1)


@registry_app.command("start")
def registry_start(
    port: Annotated[int, typer.Option(help="HTTP port (0 picks a free one).")] = 8081,
    data_dir: Annotated[Path, typer.Option(help="Folder for its pid, port and log.")] = Path(".nlpstream-registry"),
    version: Annotated[str, typer.Option(help="Apicurio Registry version (3.0.x runs on Java 17; later ones need 21).")] = "",
) -> None:
    """Start Apicurio Registry in the background, bound to 127.0.0.1; prints {"url": ...} once it answers."""
    from nlpstream.consumers.registry_local import DEFAULT_REGISTRY_VERSION, RegistryLocalError, start

    try:
        info = start(data_dir, port=port, version=version or DEFAULT_REGISTRY_VERSION)
    except RegistryLocalError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps({"url": info.url, "pid": info.pid, "data_dir": info.data_dir}))


@registry_app.command("stop")
def registry_stop(data_dir: Annotated[Path, typer.Option(help="Data folder given to start.")] = Path(".nlpstream-registry")) -> None:
    """Stop the registry started with this data folder."""
    from nlpstream.consumers.registry_local import stop

    typer.echo("stopped" if stop(data_dir) else "not running")


@registry_app.command("status")
def registry_status(data_dir: Annotated[Path, typer.Option(help="Data folder given to start.")] = Path(".nlpstream-registry")) -> None:
    """Report whether the registry of this data folder runs and answers; exit 1 when it does not."""
    from nlpstream.consumers.registry_local import status

    info, running = status(data_dir)
    typer.echo(json.dumps({"running": running, "url": info.url if info else None, "pid": info.pid if info else None}))
    if not running:
        raise typer.Exit(1)


@app.command()
def bench(
    texts: Annotated[Optional[int], typer.Option(help="Corpus size (distinct texts); default 2000 on CPU, 100000 on GPU.")] = None,
    model: ModelOpt = None,
    devices: Annotated[str, typer.Option(help="cpu, or cuda / cuda:0,cuda:1 for the GPU bench.")] = "cpu",
    precision: PrecisionOpt = None,
    warmup: Annotated[int, typer.Option(help="GPU bench: untimed warm-up texts before the measured corpus.")] = 10_000,
    peak_tflops: Annotated[Optional[float], typer.Option(help="GPU bench: dense peak TFLOP/s when the device name is not in the table.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results here.")] = None,
    baselines: Annotated[bool, typer.Option(help="Run transformers.pipeline, ONNX Runtime and OpenVINO too.")] = True,
    memory_loop: Annotated[int, typer.Option(help="Also classify this many fresh texts and report resident memory.")] = 0,
    pipeline: Annotated[bool, typer.Option("--pipeline", help="Measure the stream job's host path on a real broker instead.")] = False,
    bootstrap_servers: Annotated[Optional[str], typer.Option(help="--pipeline: broker to use (default: start a local one).")] = None,
    messages: Annotated[int, typer.Option(help="--pipeline: messages on the bench topic.")] = 200_000,
    model_messages: Annotated[int, typer.Option(help="--pipeline: messages for the builtin-model run (0 skips it).")] = 3000,
    processes: Annotated[Optional[int], typer.Option(help="--pipeline: processes of one group for the several-process row (default: the cores, at most the partitions; 1 leaves it out).")] = None,
    heads: Annotated[bool, typer.Option("--heads", help="Time one head against two heads sharing the backbone instead.")] = False,
) -> None:
    """Compare the engine with transformers.pipeline, ONNX Runtime int8 and OpenVINO bf16 (CPU), measure GPUs,
    or (--pipeline) the stream job's host path against a bare consumer."""
    logging.basicConfig(level=logging.WARNING)
    if pipeline:
        from nlpstream.jobs.pipeline_bench import run_pipeline_bench

        out = run_pipeline_bench(bootstrap_servers, messages, model_messages=model_messages, processes=processes,
                                 echo=typer.echo)
        if json_out is not None:
            json_out.write_text(json.dumps(out, indent=2))
        return
    from nlpstream.inference.bench import run_bench, run_heads_bench, run_memory_loop

    _preflight(model or "builtin:sentiment", devices, precision or "auto")
    from nlpstream.inference import InferenceError

    if heads:
        try:
            out = run_heads_bench(texts or 2000, precision or "auto", devices, echo=typer.echo)
        except InferenceError as exc:
            _model_error(exc)
        if json_out is not None:
            json_out.write_text(json.dumps(out, indent=2))
        return

    try:
        result = run_bench(n_texts=texts, model=model or "builtin:sentiment", devices=devices,
                           include_pipeline=baselines, echo=typer.echo, warmup=warmup, precision=precision or "auto",
                           peak_tflops=peak_tflops)
    except InferenceError as exc:
        _model_error(exc)
    if memory_loop:
        result["memory_loop"] = run_memory_loop(memory_loop, echo=typer.echo)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
