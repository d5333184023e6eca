"""``nlpstream demo``: a real broker, sample traffic, the stream job, a summary."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from nlpstream.consumers import kafka_local
from nlpstream.jobs.config import AlertConfig, InputConfig, KafkaConfig, MetricsConfig, ModelConfig, OutputConfig, StreamConfig
from nlpstream.jobs.stream import StreamJob

BAD_VALUES: tuple[bytes | None, ...] = (b"\xff\xfe not utf-8", b"", b"{not json", b"[1, 2, 3]", b'{"id": "no-text"}',
                                        b'{"text": "   "}', b'{"text": 42}')


DEMO_MODEL = "builtin:sentiment,builtin:topic"  # two heads, one forward pass: sentiment by topic


def sentiment_by_topic(folder: Path) -> Any:
    """A rich table of sentiment counts per customer-service topic, read back from the Parquet output."""
    import pyarrow.dataset as ds

    table = ds.dataset(str(folder), format="parquet", partitioning="hive").to_table(columns=["label", "topic_label"])
    counts = table.group_by(["topic_label", "label"]).aggregate([("label", "count")]).to_pylist()
    labels = sorted({c["label"] for c in counts})
    grid = Table(title="sentiment by topic (from the Parquet files)")
    grid.add_column("topic")
    for label in labels:
        grid.add_column(label, justify="right")
    for topic in sorted({c["topic_label"] for c in counts}):
        cells = {c["label"]: c["label_count"] for c in counts if c["topic_label"] == topic}
        grid.add_row(topic, *(str(cells.get(label, 0)) for label in labels))
    return grid


def sample_traffic() -> list[dict[str, str]]:
    """The shipped sample of customer-service and financial messages."""
    text = resources.files("nlpstream.jobs").joinpath("data/sample_traffic.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def make_messages(count: int, bad_every: int = 97) -> list[tuple[bytes | None, bytes | None]]:
    """(key, value) pairs: the sample cycled with unique ids, a bad record every ``bad_every``."""
    sample = sample_traffic()
    out: list[tuple[bytes | None, bytes | None]] = []
    for i in range(count):
        if bad_every and i % bad_every == bad_every - 1:
            out.append((None, BAD_VALUES[(i // bad_every) % len(BAD_VALUES)]))
            continue
        row = dict(sample[i % len(sample)], id=f"demo-{i:06d}")
        key = row.get("customer") or row.get("ticker")
        out.append((key.encode() if key else None, json.dumps(row, ensure_ascii=False).encode("utf-8")))
    return out


def create_topics(bootstrap: str, names: list[str], partitions: int = 3) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        for key, value in messages:
            producer.send(topic, key=key, value=value)
        producer.flush(timeout=60)
    finally:
        producer.close()


def run_demo(messages: int, output: Path, data_dir: Path | None, keep_broker: bool, devices: str) -> None:
    console = Console()
    data_dir = data_dir or kafka_local.cache_root() / "demo-broker"
    console.print(f"[bold]nlpstream demo[/]: starting a local Kafka broker in {data_dir} (first run downloads the jars)…")
    info = kafka_local.start(data_dir, port=0)
    try:
        topic = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        create_topics(info.bootstrap_servers, [topic, f"{topic}.dlq", f"{topic}.alerts"])
        batch = make_messages(messages)
        produce(info.bootstrap_servers, topic, batch)
        console.print(f"produced {len(batch)} messages to topic [cyan]{topic}[/] (3 partitions) on {info.bootstrap_servers}")
        output.mkdir(parents=True, exist_ok=True)
        alert_file = output / f"_alerts-{topic}.jsonl"  # "_" keeps Parquet readers away
        config = StreamConfig.model_construct(
            kafka=KafkaConfig(bootstrap_servers=info.bootstrap_servers, topics=[topic], group_id=f"{topic}-group"),
            input=InputConfig(),
            model=ModelConfig(model=DEMO_MODEL, devices=devices),
            output=OutputConfig(output=str(output), flush_interval=2.0),
            alerts=AlertConfig(alert_topic=f"{topic}.alerts", alert_file=str(alert_file),
                               window_key_field="customer,ticker"),
            metrics=MetricsConfig(metrics_port=0),
            max_messages=len(batch),
            idle_timeout=60.0,
        )
        job = StreamJob(config)
        summary = job.run()
    finally:
        if not keep_broker:
            kafka_local.stop(data_dir)
    table = Table(title=f"nlpstream demo — topic {topic}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("messages produced", str(len(batch)))
    table.add_row("messages consumed", str(summary.consumed))
    table.add_row("labeled (in Parquet)", str(summary.labeled))
    table.add_row("dead-lettered", f"{summary.dead_lettered} → {topic}.dlq")
    for label, count in sorted(summary.labels.items()):
        table.add_row(f"  label {label}", str(count))
    table.add_row("alerts", f"{summary.alerts} → {alert_file.name} and {topic}.alerts")
    table.add_row("Parquet files", str(len(summary.files)))
    table.add_row("throughput", f"{summary.throughput:.0f} msg/s over {summary.seconds:.1f}s (model load included)")
    console.print(table)
    if summary.labeled:
        console.print(sentiment_by_topic(output / f"topic={topic}"))
    console.print(f"output: [green]{(output / f'topic={topic}').resolve()}[/]")
    console.print(f"read it back: python -c \"import pyarrow.dataset as ds; "
                  f"print(ds.dataset('{output}', partitioning='hive').to_table().slice(0, 5))\"")
    if keep_broker:
        console.print(f"broker still running at {info.bootstrap_servers}; stop it with "
                      f"nlpstream kafka-local stop --data-dir {data_dir}")
