"""``nlpstream backfill`` behind the flags: checks, metrics, progress bar, executor choice, summary screen.

Every mistake the user can fix (an input that is missing, unreadable or has
no text column, an output that cannot work, an unknown model or device, a
broker or Ray cluster that cannot be reached, a time range without
records, a port that is taken) is one ``error: ...`` line and exit code 1;
cheap checks run before the model loads.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from nlpstream.jobs.backfill import BackfillSummary
from nlpstream.jobs.config import BackfillConfig

log = logging.getLogger(__name__)


class RateColumn(ProgressColumn):
    """Rows per second of a task since it started (an average: Ray reports whole pieces at once, which
    makes rich's short-window speed jump)."""

    def render(self, task: Any) -> Text:
        elapsed = task.elapsed
        if not elapsed or not task.completed:
            return Text("-- rows/s", style="progress.data.speed")
        return Text(f"{task.completed / elapsed:,.0f} rows/s", style="progress.data.speed")


def make_progress(console: Console) -> Progress:
    """The backfill's progress bar: done/total, percent, rate, elapsed and ETA."""
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), RateColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console)


def parse_time(value: str | None, flag: str) -> int | None:
    """Milliseconds since the epoch of an ISO-8601 time (no zone: UTC); ValueError names the flag."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        raise ValueError(f"{flag} {value!r} is not an ISO-8601 time (e.g. 2024-05-01T00:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def print_summary(console: Console, summary: BackfillSummary, cfg: BackfillConfig) -> None:
    """One screen: rows, rejects, dead letters, files, time, rate, labels."""
    console.print(f"labeled {summary.rows} rows ({summary.skipped} skipped: empty or non-string text) "
                  f"in {summary.seconds:.1f}s into {len(summary.files)} files under {cfg.output.output}")
    table = Table(title="backfill summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("executor", summary.executor)
    table.add_row("rows labeled", f"{summary.rows:,}")
    table.add_row("rejects", f"{summary.rejected:,} ({summary.skipped:,} without usable text, "
                  f"{len(summary.failed):,} the model fails on) in {cfg.output.output.rstrip('/')}/_rejects/")
    if summary.dead_lettered:
        table.add_row("dead-lettered", f"{summary.dead_lettered:,} to {cfg.dlq_topic()}")
    table.add_row("already done", f"{summary.already_done:,} (finished by an earlier run)")
    table.add_row("pieces / files", f"{summary.pieces:,} / {len(summary.files):,}")
    table.add_row("time / rate", f"{summary.seconds:,.1f} s / {summary.rate:,.0f} rows/s")
    total = sum(summary.labels.values()) or 1
    table.add_row("labels", ", ".join(f"{label} {n:,} ({n / total:.0%})" for label, n in summary.labels.most_common())
                  or "-")
    console.print(table)
    if summary.failed:
        console.print(f"[yellow]{len(summary.failed)} texts the model fails on alone were not labeled:[/yellow] "
                      + "; ".join(summary.failed[:5]) + (" ..." if len(summary.failed) > 5 else ""))


def _error(message: str) -> int:
    typer.echo(f"error: {message}", err=True)
    return 1


def run_backfill_command(cfg: BackfillConfig, inputs: list[str], kafka_topic: str | None, from_time: str | None,
                         to_time: str | None, executor: str, ray_address: str | None) -> int:
    """Run one backfill as the CLI does; returns the exit code (0, or 1 after one ``error:`` line)."""
    from nlpstream.inference import InferenceError, load_engine
    from nlpstream.inference.preflight import check_engine_options
    from nlpstream.jobs import metrics
    from nlpstream.jobs.backfill_inputs import BackfillError, expand_inputs, check_input
    from nlpstream.sinks import SinkError, check_output

    try:
        from_ms, to_ms = parse_time(from_time, "--from-time"), parse_time(to_time, "--to-time")
    except ValueError as exc:
        return _error(str(exc))
    if (from_ms is not None or to_ms is not None) and not kafka_topic:
        return _error("--from-time and --to-time select Kafka records: give --kafka-topic")
    console = Console(stderr=True)
    try:
        check_output(cfg.output.output, cfg.output.storage_options)
        check_engine_options(cfg.model.model, cfg.model.devices, cfg.model.precision)
        for f in expand_inputs(inputs, cfg.topic_name):
            check_input(f, cfg.text_field, cfg.id_field, cfg.read_block_bytes)
        if cfg.metrics.metrics_port is not None:
            port = metrics.serve_metrics(cfg.metrics.metrics_host, cfg.metrics.metrics_port)
            console.print(f"metrics on http://{cfg.metrics.metrics_host}:{port}/metrics")
        job = None
        if kafka_topic:
            from nlpstream.jobs.backfill_kafka import KafkaBackfill

            job = KafkaBackfill(cfg, kafka_topic, from_ms, to_ms)
            job.plan()
        with make_progress(console) as progress:
            if executor == "ray":
                from nlpstream.jobs.backfill_ray import run_backfill_ray

                summary = run_backfill_ray(cfg, inputs, address=ray_address, progress=progress)
            else:
                from nlpstream.jobs.backfill import run_backfill

                with load_engine(**cfg.model.engine_options()) as engine:
                    summary = job.run(engine, progress) if job is not None else run_backfill(cfg, inputs, engine,
                                                                                             progress)
    except (BackfillError, SinkError, InferenceError, metrics.MetricsPortError) as exc:
        return _error(str(exc))
    print_summary(console, summary, cfg)
    return 0
