"""Prometheus metrics of the jobs and the /metrics endpoint."""

from __future__ import annotations

from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

CONSUMED = Counter("nlpstream_messages_consumed_total", "Records polled from Kafka (duplicates skipped excluded).", ["topic"])
LABELED = Counter("nlpstream_messages_labeled_total", "Messages labeled and written to durable Parquet files.", ["topic"])
DEAD_LETTERED = Counter("nlpstream_messages_dead_lettered_total", "Messages sent to the dead-letter topic.", ["topic", "reason"])
ALERTED = Counter("nlpstream_messages_alerted_total", "Alerts fired by the rules.", ["kind"])
SKIPPED = Counter("nlpstream_messages_skipped_total", "Records skipped because durable files already hold them.", ["topic"])
BATCH_TEXTS = Histogram(
    "nlpstream_batch_texts", "Texts per micro-batch handed to the engine.",
    buckets=(1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096),
)
BATCH_TOKENS = Histogram(
    "nlpstream_batch_tokens", "Tokens (unpadded) the engine computed for one micro-batch (cache hits excluded).",
    buckets=(16, 64, 256, 1024, 4096, 16384, 65536, 262144),
)
INFERENCE_SECONDS = Histogram(
    "nlpstream_inference_seconds", "Engine time per micro-batch (tokenize, batch, forward).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
END_TO_END_SECONDS = Histogram(
    "nlpstream_end_to_end_seconds", "From the record's Kafka timestamp to its row being durable.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0),
)
CONSUMER_LAG = Gauge("nlpstream_consumer_lag",
                     "Records between this consumer's position and the partition's end offset (fetched, not yet durable "
                     "records do not count).", ["topic", "partition"])
COMMITTED_LAG = Gauge("nlpstream_consumer_committed_lag",
                      "Records between the group's committed offset and the partition's end offset: what Kafka's "
                      "consumer-group tool and KEDA report; it stays up while nothing becomes durable.",
                      ["topic", "partition"])
SCHEMA_REGISTRY_OUTAGE = Gauge(
    "nlpstream_schema_registry_outage",
    "1 while the schema registry does not answer and records with schema ids not fetched yet wait (nothing of "
    "them is committed or dead-lettered); 0 otherwise.")
SCHEMA_REGISTRY_ERRORS = Counter(
    "nlpstream_schema_registry_errors_total",
    "Schema fetches that failed because the registry did not answer, refused the credentials or failed (retried).")
COMMITS = Counter("nlpstream_offset_commits_total", "Offset commits by outcome.", ["outcome"])
FETCH_STALLS = Counter("nlpstream_fetch_stalls_total",
                       "Consumers rebuilt because assigned partitions held records that were not fetched.")
SINK_RETRIES = Counter("nlpstream_sink_retries_total", "Flushes retried after a sink or DLQ failure.")


ALERT_KINDS = ("message", "window")
COMMIT_OUTCOMES = ("ok", "error", "rebalanced")


def init_series(topics: Sequence[str], dead_letter_reasons: Sequence[str]) -> None:
    """Create every counter series whose label values are known up front, at 0.

    Prometheus sees a labeled series only from its first sample: a counter
    created at its first increment hides that increment from ``rate()`` and
    ``increase()``, and rules over a series that does not exist return
    nothing. Idempotent.
    """
    for topic in topics:
        CONSUMED.labels(topic)
        LABELED.labels(topic)
        SKIPPED.labels(topic)
        for reason in dead_letter_reasons:
            DEAD_LETTERED.labels(topic, reason)
    for kind in ALERT_KINDS:
        ALERTED.labels(kind)
    for outcome in COMMIT_OUTCOMES:
        COMMITS.labels(outcome)


def serve_metrics(host: str, port: int) -> int:
    """Start /metrics on ``host:port`` in a daemon thread; returns the bound port.

    Raises MetricsPortError when the address cannot be bound (port taken, bad host).
    """
    return int(start_metrics_server(host, port).server_address[1])


def start_metrics_server(host: str, port: int, registry: CollectorRegistry | None = None) -> WSGIServer:
    """:func:`serve_metrics`, returning the server (``shutdown()`` and ``server_close()`` stop it).

    ``registry``: what it serves (the default registry when None).
    """
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry or REGISTRY)
    except OSError as exc:
        raise MetricsPortError(f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}; "
                               "set metrics.metrics_port (0 picks a free port)") from exc
    return server


class MetricsPortError(RuntimeError):
    """The metrics endpoint could not be bound."""


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every value, at the cost of one increment per bucket, not per value.

    Uses the client's bucket and sum children (prometheus-client's Histogram
    layout); falls back to one observe per value where they are absent.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if len(values) == 0:
        return
    if bounds is None or buckets is None or total is None:
        for v in values:
            histogram.observe(v)
        return
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    counts = np.bincount(np.searchsorted(np.asarray(bounds, dtype=np.float64), arr, side="left"),
                         minlength=len(bounds))
    total.inc(float(arr.sum()))
    for i, count in enumerate(counts[: len(bounds)]):
        if count:
            buckets[i].inc(int(count))
