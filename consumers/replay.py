"""Replay a time range of one topic: manual assignment, fixed end offsets, no consumer group.

The backfill's Kafka input. :meth:`KafkaReplay.ranges` maps ``[from, to)``
(milliseconds since the epoch) to one offset range ``[start, stop)`` per
partition with the brokers' offsets-for-times lookup; ``stop`` is fixed when
the replay starts (records produced later are not read), so the replay ends.
The consumer has no group id: it never joins a group and never commits, so a
replay cannot disturb the stream job's group.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from nlpstream.consumers.client_config import ConnectionSettings, connect_error
from nlpstream.consumers.errors import ConsumerError, KafkaUnavailableError
from nlpstream.consumers.kafka_input import to_input_record
from nlpstream.consumers.records import InputRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """Offsets ``start`` (inclusive) to ``stop`` (exclusive) of one partition."""

    partition: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return max(0, self.stop - self.start)


class KafkaReplay:
    """Reads fixed offset ranges of one topic. Raises KafkaUnavailableError when the brokers cannot be
    reached, ConsumerError when the topic does not exist."""

    def __init__(self, connection: ConnectionSettings, topic: str, timeout_s: float = 30.0,
                 max_poll_records: int = 2048) -> None:
        self.topic = topic
        self.timeout_s = timeout_s
        self._max_poll_records = max_poll_records
        try:
            self._consumer = KafkaConsumer(**connection.kafka_kwargs(), group_id=None, enable_auto_commit=False,
                                           max_poll_records=max_poll_records,
                                           max_partition_fetch_bytes=8 << 20, fetch_max_bytes=16 << 20,
                                           receive_message_max_bytes=(16 << 20) + (1 << 20))
        except (KafkaError, OSError) as exc:
            raise KafkaUnavailableError(connect_error(connection, exc)) from exc
        self._stops: dict[int, int] = {}

    def partitions(self) -> list[int]:
        """The topic's partitions; ConsumerError when the brokers do not know the topic."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            parts = self._consumer.partitions_for_topic(self.topic)
            if parts:
                return sorted(parts)
            if time.monotonic() >= deadline:
                raise ConsumerError(f"topic {self.topic!r} does not exist (or has no partitions)")
            time.sleep(0.5)

    def ranges(self, from_ms: int | None, to_ms: int | None) -> list[PartitionRange]:
        """The offset range of ``[from_ms, to_ms)`` on every partition (None: the log start / the end now)."""
        tps = [TopicPartition(self.topic, p) for p in self.partitions()]
        try:
            begin = self._list("beginning_offsets", tps)
            end = self._list("end_offsets", tps)
            starts = self._by_time(tps, from_ms, begin, end)
            stops = self._by_time(tps, to_ms, end, end)
        except KafkaError as exc:
            raise KafkaUnavailableError(f"cannot read the offsets of topic {self.topic!r}: {exc}") from exc
        return [PartitionRange(tp.partition, starts[tp], max(starts[tp], min(stops[tp], end[tp]))) for tp in tps]

    def _list(self, which: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        fetcher = getattr(self._consumer, "_fetcher", None)
        if hasattr(fetcher, which):  # the public call waits request_timeout_ms (305 s) on trouble
            return getattr(fetcher, which)(tps, int(self.timeout_s * 1000))
        return getattr(self._consumer, which)(tps)

    def _by_time(self, tps: list[TopicPartition], ms: int | None, default: dict[TopicPartition, int],
                 end: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """The first offset whose timestamp is at or after ``ms`` (the end offset where none is)."""
        if ms is None:
            return dict(default)
        fetcher = getattr(self._consumer, "_fetcher", None)
        if hasattr(fetcher, "offsets_by_times"):
            found = fetcher.offsets_by_times({tp: ms for tp in tps}, int(self.timeout_s * 1000))
        else:
            found = self._consumer.offsets_for_times({tp: ms for tp in tps})
        return {tp: (found[tp].offset if found.get(tp) is not None else end[tp]) for tp in tps}

    def assign(self, positions: dict[int, int], stops: dict[int, int]) -> None:
        """Read partition ``p`` from ``positions[p]`` up to (not including) ``stops[p]``."""
        self._stops = {p: stops[p] for p in positions if positions[p] < stops[p]}
        tps = [TopicPartition(self.topic, p) for p in sorted(self._stops)]
        self._consumer.assign(tps)
        for tp in tps:
            self._consumer.seek(tp, positions[tp.partition])

    def position(self, partition: int) -> int | None:
        try:
            return self._consumer.position(TopicPartition(self.topic, partition), timeout_ms=0)
        except (KafkaError, AssertionError):
            return None

    def finished(self, partition: int) -> bool:
        """Whether every offset before the partition's stop has been read."""
        if partition not in self._stops:
            return True
        pos = self.position(partition)
        return pos is not None and pos >= self._stops[partition]

    def done(self) -> bool:
        return all(self.finished(p) for p in self._stops)

    def poll(self, timeout_s: float = 0.5) -> list[InputRecord]:
        """Records of the ranges in offset order per partition; nothing at or past a stop offset.

        A partition that reached its stop is paused. A failed fetch is logged
        and gives nothing (the caller polls again; its own deadline decides).
        """
        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=self._max_poll_records)
        except KafkaError as exc:
            log.warning("poll failed, retrying: %s", exc)
            time.sleep(min(timeout_s, 1.0))
            return []
        out = [to_input_record(r) for records in batches.values() for r in records
               if r.offset < self._stops.get(r.partition, -1)]
        finished = [TopicPartition(self.topic, p) for p in self._stops if self.finished(p)]
        if finished:
            self._consumer.pause(*finished)
        return out

    def close(self) -> None:
        """Close the consumer (it has no group: nothing is committed or left)."""
        self._consumer.close(autocommit=False)

