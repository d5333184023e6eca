"""A thin wrapper over kafka-python's consumer that speaks plain records.

Auto-commit is always off: the job commits with :meth:`KafkaInput.commit`
after its sinks are durable. Rebalance callbacks are forwarded as lists of
``(topic, partition)``; they run while the caller is inside :meth:`poll`
and must not call back into this consumer except :meth:`seek` (a local
operation), which keeps them valid on kafka-python's 2.x and 3.x threading.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from nlpstream.consumers.client_config import ConnectionSettings, connect_error
from nlpstream.consumers.errors import ConsumerError, KafkaUnavailableError
from nlpstream.consumers.records import InputRecord

log = logging.getLogger(__name__)

TP = tuple[str, int]
PartitionsCallback = Callable[[list[TP]], None]


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    """Group consumption settings."""

    topics: tuple[str, ...]
    group_id: str
    auto_offset_reset: str = "earliest"
    max_poll_records: int = 512
    max_poll_interval_ms: int = 300_000
    session_timeout_ms: int = 45_000
    # None: each client's own measured best. kafka-python 1 MiB: it fetches a partition again only once its
    # buffered records are used up, and with 8 MiB fetches the job (instant engine) moved 0.84x the messages
    # and a simulated device sat idle a tenth of the time waiting on one such fetch; confluent 8 MiB
    # (librdkafka prefetches on its own threads: 1 MiB moved 0.87x). `nlpstream bench --pipeline` measures both.
    max_partition_fetch_bytes: int | None = None
    fetch_max_bytes: int = 16 * 1024 * 1024
    group_instance_id: str | None = None


def to_input_record(r: Any) -> InputRecord:
    """kafka-python's ConsumerRecord as plain data (a missing or negative timestamp becomes 0)."""
    timestamp, headers = r.timestamp, r.headers  # positional below: one call per message on the stream path
    return InputRecord(r.topic, r.partition, r.offset, r.key, r.value,
                       int(timestamp) if timestamp is not None and timestamp >= 0 else 0,
                       tuple((k, v) for k, v in headers) if headers else ())


class _Listener(ConsumerRebalanceListener):
    def __init__(self, assigned: PartitionsCallback, revoked: PartitionsCallback, lost: PartitionsCallback) -> None:
        self._assigned, self._revoked, self._lost = assigned, revoked, lost

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._assigned(sorted((tp.topic, tp.partition) for tp in assigned))

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self._revoked(sorted((tp.topic, tp.partition) for tp in revoked))

    def on_partitions_lost(self, lost: Iterable[TopicPartition]) -> None:
        self._lost(sorted((tp.topic, tp.partition) for tp in lost))


class KafkaInput:
    """Subscribes to topics as one member of a consumer group.

    Raises KafkaUnavailableError (recoverable) when the brokers cannot be
    reached at start-up.
    """

    def __init__(
        self,
        connection: ConnectionSettings,
        settings: ConsumerSettings,
        on_assigned: PartitionsCallback,
        on_revoked: PartitionsCallback,
        on_lost: PartitionsCallback,
    ) -> None:
        try:
            self._consumer = KafkaConsumer(
                **connection.kafka_kwargs(),
                group_id=settings.group_id,
                enable_auto_commit=False,
                auto_offset_reset=settings.auto_offset_reset,
                max_poll_records=settings.max_poll_records,
                max_poll_interval_ms=settings.max_poll_interval_ms,
                session_timeout_ms=settings.session_timeout_ms,
                max_partition_fetch_bytes=settings.max_partition_fetch_bytes or 1 << 20,
                fetch_max_bytes=settings.fetch_max_bytes,
                # a fetch response holds up to fetch_max_bytes; the client refuses larger frames
                receive_message_max_bytes=settings.fetch_max_bytes + (1 << 20),
                **({"group_instance_id": settings.group_instance_id} if settings.group_instance_id else {}),
            )
        except (KafkaError, OSError) as exc:  # OSError: TLS handshake refused, connection reset
            raise KafkaUnavailableError(connect_error(connection, exc)) from exc
        self._consumer.subscribe(list(settings.topics), listener=_Listener(on_assigned, on_revoked, on_lost))
        self._last_poll_warning = 0.0

    def poll(self, timeout_s: float, max_records: int | None = None) -> list[InputRecord]:
        """Fetch available records (waits at most ``timeout_s``), in offset order per partition."""
        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as exc:  # broker gone or group trouble: keep the loop alive, retry next poll
            now = time.monotonic()
            if now - self._last_poll_warning > 10.0:
                log.warning("poll failed, retrying: %s", exc)
                self._last_poll_warning = now
            time.sleep(min(timeout_s, 1.0))
            return []
        return [to_input_record(r) for records in batches.values() for r in records]

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Set the next offset to fetch for an assigned partition (safe inside callbacks)."""
        self._consumer.seek(TopicPartition(topic, partition), offset)

    def commit(self, offsets: dict[TP, int]) -> bool:
        """Commit ``next offset to read`` per partition; only the job calls this.

        Returns False when the group rebalanced and the commit was refused
        (the records will be redelivered; the job's resume logic handles it).
        Raises ConsumerError on other failures.
        """
        if not offsets:
            return True
        payload = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        try:
            self._consumer.commit(payload, timeout_ms=15_000)
        except CommitFailedError as exc:
            log.info("offset commit refused after a rebalance (the records are redelivered; files stay exact): %s", exc)
            return False
        except KafkaError as exc:
            raise ConsumerError(f"offset commit failed: {exc}") from exc
        return True

    def committed(self, topic: str, partition: int) -> int | None:
        """The group's committed offset for a partition (network call; not from callbacks)."""
        return self._consumer.committed(TopicPartition(topic, partition))

    def committed_offsets(self, partitions: Iterable[TP], timeout_s: float = 10.0) -> dict[TP, int | None]:
        """The group's committed offsets (None: never committed); raises KafkaError after ``timeout_s``.

        A network call: the main loop's, never a rebalance callback's.
        """
        tps = [TopicPartition(t, p) for t, p in partitions]
        if not tps:
            return {}
        found = self._consumer._coordinator.fetch_committed_offsets(tps, timeout_ms=int(timeout_s * 1000))
        return {(tp.topic, tp.partition): (found[tp].offset if tp in found and found[tp].offset >= 0 else None)
                for tp in tps}

    def beginning_offsets(self, partitions: Iterable[TP], timeout_s: float = 10.0) -> dict[TP, int]:
        """Log start offsets from the brokers; raises KafkaError (KafkaTimeoutError) after ``timeout_s``."""
        return self._list_offsets("beginning_offsets", partitions, timeout_s)

    def highwater(self, topic: str, partition: int) -> int | None:
        """Last known end offset of an assigned partition, or None before the first fetch."""
        try:
            return self._consumer.highwater(TopicPartition(topic, partition))
        except KafkaError:
            return None

    def position(self, topic: str, partition: int) -> int | None:
        """The next offset this consumer will fetch, or None while it is not known yet (never blocks)."""
        try:
            return self._consumer.position(TopicPartition(topic, partition), timeout_ms=0)
        except (KafkaError, AssertionError):
            return None

    def end_offsets(self, partitions: Iterable[TP], timeout_s: float = 10.0) -> dict[TP, int]:
        """End offsets from the brokers; raises KafkaError (KafkaTimeoutError) after ``timeout_s``."""
        return self._list_offsets("end_offsets", partitions, timeout_s)

    def _list_offsets(self, which: str, partitions: Iterable[TP], timeout_s: float) -> dict[TP, int]:
        tps = [TopicPartition(t, p) for t, p in partitions]
        if not tps:
            return {}
        fetcher = getattr(self._consumer, "_fetcher", None)
        if hasattr(fetcher, which):  # kafka-python 2.3: the public call waits request_timeout_ms (305 s)
            offsets = getattr(fetcher, which)(tps, int(timeout_s * 1000))
        else:
            offsets = getattr(self._consumer, which)(tps)
        return {(tp.topic, tp.partition): off for tp, off in offsets.items()}

    def fetch_state(self) -> str:
        """Best-effort description of the client's fetch state, for the log when fetching stalls."""
        fetcher = getattr(self._consumer, "_fetcher", None)
        parts = []
        for name in ("_nodes_with_pending_fetch_requests", "_completed_fetches", "_fetch_futures"):
            value = getattr(fetcher, name, None)
            parts.append(f"{name.strip('_')}={len(value) if hasattr(value, '__len__') else value}")
        paused = sorted((tp.topic, tp.partition) for tp in self._consumer.paused())
        return ", ".join(parts) + f", paused={paused}"

    def assignment(self) -> list[TP]:
        return sorted((tp.topic, tp.partition) for tp in self._consumer.assignment())

    def pause(self, partitions: Iterable[TP]) -> None:
        self._consumer.pause(*(TopicPartition(t, p) for t, p in partitions))

    def resume(self, partitions: Iterable[TP]) -> None:
        self._consumer.resume(*(TopicPartition(t, p) for t, p in partitions))

    def close(self) -> None:
        """Leave the group. Never commits, and runs no rebalance callback: the caller settles its state."""
        self._consumer.close(autocommit=False)
