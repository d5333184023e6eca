"""Output sinks: Parquet files (local or fsspec URL), Delta Lake and Iceberg tables, and alert sinks.

A sink is small: ``write(rows)``, ``flush()`` (durable on return),
``close()``. Sinks never commit offsets; the job does, after every flush.
For a flush beside the loop that writes, ``flush()`` is ``seal()`` (set
aside what was written so far) then ``flush_sealed()`` (make that durable,
on any one thread, while ``write`` goes on filling the next part).
"""

from nlpstream.sinks.alerts import Alert, AlertSink, FileAlertSink, KafkaAlertSink, WebhookAlertSink
from nlpstream.sinks.check import check_output
from nlpstream.sinks.errors import SinkBackpressure, SinkConfigError, SinkError, SinkWriteError
from nlpstream.sinks.naming import FileKey, parse_name
from nlpstream.sinks.parquet import ParquetSink, WrittenFile
from nlpstream.sinks.schema import OutputRow, arrow_schema, to_table
from nlpstream.sinks.tables import DeltaSink, IcebergSink

__all__ = [
    "Alert",
    "AlertSink",
    "DeltaSink",
    "FileAlertSink",
    "FileKey",
    "IcebergSink",
    "KafkaAlertSink",
    "OutputRow",
    "ParquetSink",
    "SinkBackpressure",
    "SinkConfigError",
    "SinkError",
    "SinkWriteError",
    "WebhookAlertSink",
    "WrittenFile",
    "arrow_schema",
    "check_output",
    "parse_name",
    "to_table",
]
