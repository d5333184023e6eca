"""Prometheus metrics of the sinks."""

from prometheus_client import Counter, Histogram

ROWS_WRITTEN = Counter("nlpstream_sink_rows_written_total", "Rows written to finished Parquet files.")
ROWS_ALREADY_WRITTEN = Counter("nlpstream_sink_rows_already_written_total",
                               "Rows not written because finished files of another worker already hold them.")
FILES_WRITTEN = Counter("nlpstream_sink_files_written_total", "Parquet files finished (renamed into place).")
WRITE_ERRORS = Counter("nlpstream_sink_write_errors_total", "Failed Parquet file writes (retried by the job).")
FLUSH_SECONDS = Histogram(
    "nlpstream_sink_file_write_seconds",
    "Time to write, sync and rename one Parquet file.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
ALERTS_SENT = Counter("nlpstream_alerts_sent_total", "Alerts delivered to an alert sink.", ["sink"])
