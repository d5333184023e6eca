"""Dead-letter routing (Kafka Connect conventions).

The original key, value and timestamp are kept; headers name the error
class and message and the source topic, partition and offset. Message
contents are never logged.
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from nlpstream.consumers.client_config import ConnectionSettings, connect_error
from nlpstream.consumers.errors import ConsumerError
from nlpstream.consumers.records import InputRecord

HEADER_CLASS = "nlpstream.error.class"
HEADER_MESSAGE = "nlpstream.error.message"
HEADER_TOPIC = "nlpstream.source.topic"
HEADER_PARTITION = "nlpstream.source.partition"
HEADER_OFFSET = "nlpstream.source.offset"
_MAX_MESSAGE = 1000


class DeadLetterError(ConsumerError):
    """Dead letters could not be delivered; the job must not commit past them."""

    recoverable = True


def dlq_headers(record: InputRecord, error_class: str, message: str) -> list[tuple[str, bytes]]:
    """The five nlpstream headers, appended to the record's own headers."""
    own = [(k, v if v is not None else b"") for k, v in record.headers]
    return own + [
        (HEADER_CLASS, error_class.encode()),
        (HEADER_MESSAGE, message[:_MAX_MESSAGE].encode("utf-8", "replace")),
        (HEADER_TOPIC, record.topic.encode()),
        (HEADER_PARTITION, str(record.partition).encode()),
        (HEADER_OFFSET, str(record.offset).encode()),
    ]


def resend_failed(producer: Any, topic: str, sent: list[tuple[dict[str, Any], Any]], timeout_s: float) -> list:
    """Wait for every ``(message, future)`` in ``sent`` to be acknowledged and return ``sent``; when a send
    failed (a broker outage outlasting the producer's delivery timeout), raise its KafkaError after sending
    again, in ``sent``'s place, every message whose future failed: the retry waits for the new sends. A failed
    future never recovers, so waiting on it again would fail for ever."""
    producer.flush(timeout=timeout_s)
    error: KafkaError | None = None
    for i, (message, fut) in enumerate(sent):
        try:
            fut.get(timeout=timeout_s)
        except KafkaError as exc:
            if not fut.is_done:  # not failed, only slow: waited for again by the retry
                error = error or exc
                continue
            error = error or exc
            sent[i] = (message, producer.send(topic, **message))
    if error is not None:
        raise error
    return sent


class DeadLetterQueue:
    """Sends bad records to one topic; delivered (acks=all) when :meth:`flush` returns.

    ``send`` and :meth:`seal` run on the job's loop; :meth:`flush_sealed` may
    run on another thread meanwhile (the producer is thread-safe).
    """

    def __init__(self, connection: ConnectionSettings, topic: str, flush_timeout_s: float = 30.0,
                 producer: Any | None = None) -> None:
        self.topic = topic
        self.flush_timeout_s = flush_timeout_s
        try:
            self._producer = producer or KafkaProducer(
                **connection.kafka_kwargs(), acks="all", linger_ms=5, max_request_size=16 * 1024 * 1024
            )
        except (KafkaError, OSError) as exc:  # OSError: TLS handshake refused, connection reset
            raise DeadLetterError(f"cannot create the dead-letter producer: {connect_error(connection, exc)}") from exc
        self._futures: list[tuple[dict[str, Any], Any]] = []  # (message, future) queued since the last seal
        self._sealed: list[tuple[dict[str, Any], Any]] = []  # set aside for the flush under way (or the one that failed)

    def send(self, record: InputRecord, error_class: str, message: str) -> None:
        """Queue one dead letter; raises DeadLetterError when the producer refuses it."""
        message_kw = {"key": record.key, "value": record.value, "headers": dlq_headers(record, error_class, message),
                      "timestamp_ms": record.timestamp_ms or None}
        try:
            self._futures.append((message_kw, self._producer.send(self.topic, **message_kw)))
        except KafkaError as exc:
            raise DeadLetterError(f"cannot queue a dead letter for {record.topic}-{record.partition}@{record.offset}: {exc}") from exc

    def seal(self) -> None:
        """Set aside the dead letters queued so far for :meth:`flush_sealed` (a flush beside the loop that sends);
        not while such a flush runs."""
        if self._futures:
            self._sealed.extend(self._futures)
            self._futures = []

    def flush(self) -> int:
        """Wait until every queued dead letter is acknowledged; returns how many."""
        self.seal()
        return self.flush_sealed()

    def flush_sealed(self) -> int:
        """Wait until every sealed dead letter is acknowledged; returns how many (on error they stay sealed)."""
        if not self._sealed:
            return 0
        try:
            self._sealed = resend_failed(self._producer, self.topic, self._sealed, self.flush_timeout_s)
        except KafkaError as exc:
            raise DeadLetterError(f"dead letters not acknowledged by topic {self.topic!r}: {exc}") from exc
        count = len(self._sealed)
        self._sealed = []
        return count

    def close(self) -> None:
        self.flush()
        self._producer.close(timeout=self.flush_timeout_s)
