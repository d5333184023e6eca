"""The stream job's consumer on confluent-kafka (librdkafka), with :class:`KafkaInput`'s surface.

Chosen with ``kafka.client: confluent``. librdkafka fetches and parses record
batches in C on its own threads, where kafka-python parses every record in
Python on the polling thread (about a third of the instant-engine job's time
with kafka-python, see README "Performance").

What the job relies on, and how it maps here (kafka-python's behaviour is
the reference):

- Rebalance callbacks run on the polling thread, inside :meth:`poll`, as
  with kafka-python 2.x. The group protocol is pinned to the classic eager
  one with kafka-python's assignors (``range,roundrobin``), so a group may
  mix both clients.
- Where a newly assigned partition starts: the job's assignment callback
  calls :meth:`seek` (where its files end). librdkafka cannot seek a
  partition before it is assigned, so seeks and pauses asked for inside the
  callback are collected and the partitions are assigned with explicit start
  offsets right after it (``assign`` from ``on_assign``): the seek, else the
  committed offset, else the reset policy; a start outside the log's range
  takes the reset policy, as either client would on the first fetch. When
  the brokers do not answer these reads in time, librdkafka resolves the
  start itself and the position stays unknown until the first record.
- Positions: librdkafka knows one only once a record of the partition has
  been handed out; until then :meth:`position` answers the start offset, so
  a caught-up partition counts as caught up (the idle timer, the fetch-stall
  guard). librdkafka's own position moves past transaction markers.
- A new assignment starts unpaused (librdkafka would keep an earlier pause
  through a revocation) unless the job paused it in its callback.
- ``isolation.level`` is ``read_uncommitted``, as kafka-python: records of
  aborted transactions are read too, so output does not depend on the client.
- :meth:`close` leaves the group without running the job's callbacks
  (librdkafka would run them from ``close``): the caller settles its own
  state, as with :class:`KafkaInput`.
- A commit the group refuses after a rebalance returns False; other
  failures raise :class:`ConsumerError`. A synchronous commit can wait up to
  about ``session_timeout_ms`` while the group coordinator is away
  (kafka-python gives up after 15 s).
- A failure inside the assignment, or a fatal client error (a static
  member fenced), raises :class:`ConsumerError` from :meth:`poll` (an
  assignment's failure once that poll's timeout ends, dropping what it
  fetched: nothing of it was handed out or committed): the job stops and its
  supervisor restarts it.

Not supported with this client: ``kafka.transactions`` (the transactional
producer is kafka-python's and commits offsets for its consumer's group
generation); the config refuses the combination.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from operator import methodcaller
from typing import Any

from nlpstream.consumers.client_config import ConnectionSettings
from nlpstream.consumers.errors import ConsumerError
from nlpstream.consumers.kafka_input import TP, ConsumerSettings, PartitionsCallback
from nlpstream.consumers.records import InputRecord

log = logging.getLogger(__name__)
# a polled message's parts, read with C-level calls a column at a time
_ERROR, _TIMESTAMP, _HEADERS = methodcaller("error"), methodcaller("timestamp"), methodcaller("headers")
_TOPIC, _PARTITION, _OFFSET = methodcaller("topic"), methodcaller("partition"), methodcaller("offset")
_KEY, _VALUE = methodcaller("key"), methodcaller("value")

_OFFSET_INVALID = -1001  # librdkafka: no offset (use the committed one, else the reset policy)


def librdkafka_config(connection: ConnectionSettings) -> dict[str, Any]:
    """librdkafka's settings for the same brokers, security protocol, SASL and TLS files."""
    conf: dict[str, Any] = {
        "bootstrap.servers": ",".join(s.strip() for s in connection.bootstrap_servers.split(",") if s.strip()),
        "security.protocol": connection.security_protocol.lower(),
        "client.id": connection.client_id,
    }
    optional = {
        "sasl.mechanism": connection.sasl_mechanism,
        "sasl.username": connection.sasl_username,
        "sasl.password": connection.sasl_password,
        "ssl.ca.location": connection.ssl_cafile,
        "ssl.certificate.location": connection.ssl_certfile,
        "ssl.key.location": connection.ssl_keyfile,
        "ssl.key.password": connection.ssl_password,
    }
    conf.update({k: v for k, v in optional.items() if v is not None})
    return conf


def _refused_codes() -> frozenset[int]:
    """Commit errors that mean "the group moved on": the records are redelivered to the next owner."""
    from confluent_kafka import KafkaError

    names = ("REBALANCE_IN_PROGRESS", "ILLEGAL_GENERATION", "UNKNOWN_MEMBER_ID", "FENCED_INSTANCE_ID")
    return frozenset(getattr(KafkaError, n) for n in names if hasattr(KafkaError, n))


class ConfluentInput:
    """Subscribes to topics as one member of a consumer group, through librdkafka.

    Raises ConsumerError when the client cannot be created (a setting
    librdkafka refuses, a TLS file it cannot read). librdkafka connects
    lazily, so unreachable brokers show up as empty polls, as with
    :class:`KafkaInput` after start-up (the job waits for the brokers before
    it builds a consumer). A fatal client error (static membership fenced)
    raises ConsumerError from :meth:`poll`.
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
            from confluent_kafka import Consumer, KafkaError, KafkaException
        except ImportError as exc:  # pragma: no cover - the extra is part of the test install
            raise ConsumerError("kafka.client 'confluent' needs the confluent-kafka package: "
                                "pip install 'nlpstream[confluent]'") from exc
        self._callbacks = (on_assigned, on_revoked, on_lost)
        self._error_logged: dict[Any, float] = {}
        self._refused = _refused_codes()
        self._kafka_exception = KafkaException
        self._stale_leader = frozenset({KafkaError.FENCED_LEADER_EPOCH, KafkaError.UNKNOWN_LEADER_EPOCH,
                                        KafkaError.NOT_LEADER_FOR_PARTITION})
        conf = librdkafka_config(connection)
        client_log = logging.getLogger("nlpstream.consumers.librdkafka")
        self._admin_conf = dict(conf, logger=client_log)  # served by the admin client's poll(0)
        self._admin: Any = None  # made on first use: beginning and end offsets
        conf.update({
            "group.id": settings.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": settings.auto_offset_reset,
            # as kafka-python: aborted transactional records are read too, so output does not depend on the client
            "isolation.level": "read_uncommitted",
            # the eager protocol with kafka-python's assignors, pinned: one group may mix both clients, and
            # assign() from on_assign is only right for it
            "group.protocol": "classic",
            "partition.assignment.strategy": "range,roundrobin",
            "max.poll.interval.ms": settings.max_poll_interval_ms,
            "session.timeout.ms": settings.session_timeout_ms,
            "max.partition.fetch.bytes": settings.max_partition_fetch_bytes or 8 << 20,
            # the consumer's queue (shared by its partitions) holds more than queued.min.messages (100,000)
            # after one fetch of a few partitions; librdkafka then waits this long before it looks again
            # (1 s by default), and the job drained 170,000 messages in 0.6 s, then waited ~0.4 s for data
            # (librdkafka's fetch debug log). 20 ms: the queue is refilled as soon as it falls below
            "fetch.queue.backoff.ms": 20,
            "fetch.max.bytes": settings.fetch_max_bytes,
            "receive.message.max.bytes": settings.fetch_max_bytes + (1 << 20),
            "error_cb": self._on_error,
            "logger": client_log,
        })
        if settings.group_instance_id:
            conf["group.instance.id"] = settings.group_instance_id
        try:
            self._consumer = Consumer(conf)
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConsumerError(f"cannot create the confluent-kafka consumer: {exc}") from exc
        self._max_records = settings.max_poll_records
        self._assigned: set[TP] = set()  # kept by the callbacks (the loop asks for it several times a round)
        self._starts: dict[TP, int] = {}  # the position of a partition with no record handed out since it was set
        self._reset = settings.auto_offset_reset
        self._paused: set[TP] = set()
        self._ever_paused: set[TP] = set()  # librdkafka keeps a pause through revocation and a new assignment
        self._fatal: Any = None
        self._assigning: dict[TP, int] | None = None  # inside on_assign: the start offsets asked for by seek
        self._pause_after_assign: set[TP] = set()
        self._closing = False
        self._last_poll_warning = 0.0
        self._consumer.subscribe(list(settings.topics), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_lost)

    # -- callbacks (polling thread, inside consume) --------------------------------------
    def _on_error(self, error: Any) -> None:
        """librdkafka's client-level errors (brokers down, TLS refused), once per kind per 10 s: it retries them."""
        now, code = time.monotonic(), getattr(error, "code", lambda: None)()
        if self._is_fatal(error):
            self._fatal = error  # the client cannot go on: poll raises it
        if now - self._error_logged.get(code, -1e9) > 10.0:
            self._error_logged[code] = now
            log.warning("kafka client: %s", error)

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        from confluent_kafka import TopicPartition

        if self._closing:  # an assignment served by close(): librdkafka assigns and revokes it without the job
            return
        tps = sorted((p.topic, p.partition) for p in partitions)
        self._assigning, self._pause_after_assign = {}, set()
        try:
            self._callbacks[0](tps)
            asked = self._assigning
            starts = self._start_offsets(consumer, tps, asked)
            consumer.assign([TopicPartition(t, p, starts.get((t, p), _OFFSET_INVALID)) for t, p in tps])
            self._assigned, self._starts = set(tps), starts
            paused = self._pause_after_assign & set(tps)
            # as kafka-python, a new assignment starts unpaused unless the job paused it just now
            unpause = [TopicPartition(t, p) for t, p in tps if (t, p) in self._ever_paused and (t, p) not in paused]
            if unpause:
                consumer.resume(unpause)
            self._ever_paused -= set(tps) - paused
            if paused:
                consumer.pause([TopicPartition(t, p) for t, p in sorted(paused)])
                self._paused |= paused
                self._ever_paused |= paused
        except Exception as exc:  # noqa: BLE001 - not a KafkaException: the loop must stop, not retry the poll
            raise ConsumerError(f"partition assignment failed: {exc}") from exc
        finally:
            self._assigning = None

    def _start_offsets(self, consumer: Any, tps: list[TP], asked: dict[TP, int]) -> dict[TP, int]:
        """Where each partition starts: the job's seek, else the group's committed offset, else the reset policy.

        Resolved here rather than left to librdkafka because its position is
        only known once a record of the partition has been handed out; the
        job's idle timer and fetch-stall guard need it before (a partition
        with nothing new must count as caught up). If the brokers do not
        answer in time, librdkafka resolves the rest itself and those
        positions stay unknown until their first record.
        """
        from confluent_kafka import TopicPartition

        if not tps:
            return {}
        starts = dict(asked)
        unsought = [TopicPartition(t, p) for t, p in tps if (t, p) not in starts]
        try:
            for tp in consumer.committed(unsought, timeout=10.0) if unsought else ():
                if tp.error is None and tp.offset >= 0:
                    starts[(tp.topic, tp.partition)] = tp.offset
                elif tp.error is not None:  # unknown, not "never committed": librdkafka resolves it
                    starts[(tp.topic, tp.partition)] = _OFFSET_INVALID
        except Exception as exc:  # noqa: BLE001 - librdkafka resolves them itself
            log.warning("committed offsets of %s not read (%s): the client resolves them", unsought, exc)
            for tp in unsought:
                starts.setdefault((tp.topic, tp.partition), _OFFSET_INVALID)
        # out of the log's range (retention deleted it, or nothing committed): the reset policy, as librdkafka
        known = [tp for tp in tps if starts.get(tp) != _OFFSET_INVALID]
        try:
            low, high = self._list_offsets(known, 10.0, "earliest", "latest")
        except Exception as exc:  # noqa: BLE001 - the seeks and committed offsets stand; the client resets the rest
            log.warning("log ranges of %s not read (%s): starts not checked against them", known, exc)
        else:
            for tp in known:
                start = starts.get(tp)
                if start is None or not low[tp] <= start <= high[tp]:
                    starts[tp] = low[tp] if self._reset == "earliest" else high[tp]
        return {tp: start for tp, start in starts.items() if start is not None and start != _OFFSET_INVALID}

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        self._taken_away(partitions, self._callbacks[1])

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        self._taken_away(partitions, self._callbacks[2])

    def _taken_away(self, partitions: list[Any], callback: PartitionsCallback) -> None:
        """Revoked or lost partitions: the job's callback (not during close), then they are forgotten here."""
        tps = sorted((p.topic, p.partition) for p in partitions)
        self._paused.difference_update(tps)
        try:
            if not self._closing:
                callback(tps)
        finally:
            self._assigned.difference_update(tps)
            for tp in tps:
                self._starts.pop(tp, None)

    # -- the loop's calls ------------------------------------------------------------------
    def poll(self, timeout_s: float, max_records: int | None = None) -> list[InputRecord]:
        """Fetch available records (waits at most ``timeout_s``), in offset order per partition."""
        if self._fatal is not None:
            raise ConsumerError(f"the consumer failed and cannot go on: {self._fatal}")
        limit = max_records or self._max_records
        try:
            # consume() waits for a whole batch or the timeout: what is queued now, else the first message to
            # arrive and what came with it (a message waits for no batch to fill, as with kafka-python)
            messages = self._consumer.consume(num_messages=limit, timeout=0)
            if not messages:
                first = self._consumer.poll(timeout_s)
                if first is not None:
                    messages = [first, *self._consumer.consume(num_messages=limit - 1, timeout=0)] if limit > 1 \
                        else [first]
        except self._kafka_exception as exc:  # broker or group trouble: keep the loop alive, retry next poll
            error = exc.args[0] if exc.args else None
            if self._is_fatal(error):
                raise ConsumerError(f"the consumer failed and cannot go on: {error}") from exc
            self._warn_poll(exc)
            time.sleep(min(timeout_s, 1.0))
            return []
        if not messages:
            return []
        # records only (the usual case): by column. Identity, not list.count(None): KafkaError's == against None
        # leaves a TypeError pending that surfaces at a later, unrelated call
        if all(error is None for error in map(_ERROR, messages)):
            stamps = [ts if kind and ts >= 0 else 0 for kind, ts in map(_TIMESTAMP, messages)]
            headers = [tuple(h) if h else () for h in map(_HEADERS, messages)]
            return list(map(InputRecord, map(_TOPIC, messages), map(_PARTITION, messages), map(_OFFSET, messages),
                            map(_KEY, messages), map(_VALUE, messages), stamps, headers))
        records = []
        append = records.append
        for m in messages:
            if m.error() is not None:  # a client-side event (an unknown topic, a partition error): not a record
                if self._is_fatal(m.error()):  # librdkafka hands a group consumer's fatal error out as an event
                    raise ConsumerError(f"the consumer failed and cannot go on: {m.error()}")
                self._warn_poll(m.error())
                continue
            ts_type, ts = m.timestamp()
            headers = m.headers()
            append(InputRecord(m.topic(), m.partition(), m.offset(), m.key(), m.value(),
                               ts if ts_type and ts >= 0 else 0, tuple(headers) if headers else ()))
        return records

    def _is_fatal(self, error: Any) -> bool:
        """A fatal client error: from ``error_cb``, or handed out by ``consume`` (a group consumer's, as an event)."""
        from confluent_kafka import KafkaError

        return error is not None and hasattr(error, "code") and (error.code() == KafkaError._FATAL or error.fatal())

    def _warn_poll(self, error: Any) -> None:
        now = time.monotonic()
        if now - self._last_poll_warning > 10.0:
            log.warning("poll failed, retrying: %s", error)
            self._last_poll_warning = now

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Set the next offset to fetch for an assigned partition (inside the assignment callback: its start)."""
        if self._assigning is not None:
            self._assigning[(topic, partition)] = offset
            return
        from confluent_kafka import TopicPartition

        try:
            self._consumer.seek(TopicPartition(topic, partition, offset))
        except self._kafka_exception as exc:
            raise ConsumerError(f"seek {topic}-{partition} to {offset} failed: {exc}") from exc
        self._starts[(topic, partition)] = offset

    def commit(self, offsets: dict[TP, int]) -> bool:
        """Commit ``next offset to read`` per partition; False when the group refused it after a rebalance."""
        if not offsets:
            return True
        from confluent_kafka import TopicPartition

        try:
            result = self._consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                           asynchronous=False)
        except self._kafka_exception as exc:
            error = exc.args[0] if exc.args else None
            if self._refused_commit([error]):
                return False
            raise ConsumerError(f"offset commit failed: {exc}") from exc
        failed = [tp for tp in result or () if tp.error is not None]
        if failed:
            if self._refused_commit([tp.error for tp in failed]):
                return False
            raise ConsumerError(f"offset commit failed: {failed[0].topic}-{failed[0].partition}: {failed[0].error}")
        return True

    def _refused_commit(self, errors: list[Any]) -> bool:
        """True (and one INFO line) when every error is the group refusing a commit after a rebalance."""
        if not all(getattr(e, "code", lambda: None)() in self._refused for e in errors):
            return False
        log.info("offset commit refused after a rebalance (the records are redelivered; files stay exact): %s",
                 errors[0])
        return True

    def committed(self, topic: str, partition: int) -> int | None:
        """The group's committed offset for a partition (network call; not from callbacks)."""
        return self.committed_offsets([(topic, partition)])[(topic, partition)]

    def committed_offsets(self, partitions: Iterable[TP], timeout_s: float = 10.0) -> dict[TP, int | None]:
        """The group's committed offsets (None: never committed).

        Raises KafkaException after ``timeout_s``, ConsumerError when a partition's offset could not be read.
        """
        from confluent_kafka import TopicPartition

        tps = [TopicPartition(t, p) for t, p in partitions]
        if not tps:
            return {}
        found = self._consumer.committed(tps, timeout=timeout_s)
        failed = [tp for tp in found if tp.error is not None]
        if failed:
            raise ConsumerError(f"committed offset of {failed[0].topic}-{failed[0].partition}: {failed[0].error}")
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in found}

    def beginning_offsets(self, partitions: Iterable[TP], timeout_s: float = 10.0) -> dict[TP, int]:
        """Log start offsets from the brokers; raises KafkaException (or a timeout) after ``timeout_s``."""
        return self._list_offsets(partitions, timeout_s, "earliest")[0]

    def end_offsets(self, partitions: Iterable[TP], timeout_s: float = 10.0) -> dict[TP, int]:
        """End offsets from the brokers; raises KafkaException (or a timeout) after ``timeout_s``."""
        return self._list_offsets(partitions, timeout_s, "latest")[0]

    def _list_offsets(self, partitions: Iterable[TP], timeout_s: float, *ends: str) -> list[dict[TP, int]]:
        """Log start (``"earliest"``) or end (``"latest"``) offsets, one ListOffsets request per ``ends`` item, all
        in flight at once, through an admin client of its own (the consumer's connection would queue them behind
        a fetch that may wait ``fetch.wait.max.ms``: half a second a partition, measured)."""
        from confluent_kafka import TopicPartition
        from confluent_kafka.admin import AdminClient, OffsetSpec

        tps = list(partitions)
        if not tps:
            return [{} for _ in ends]
        if self._admin is None:
            self._admin = AdminClient(self._admin_conf)
        admin = self._admin
        try:
            asked = [admin.list_offsets({TopicPartition(t, p): getattr(OffsetSpec, end)() for t, p in tps},
                                        request_timeout=timeout_s) for end in ends]
            return [{(tp.topic, tp.partition): fut.result(timeout=timeout_s + 1.0).offset for tp, fut in futures.items()}
                    for futures in asked]
        except self._kafka_exception as exc:
            # Seen with confluent-kafka 2.16.1: after a broker restart the admin client's ListOffsets failed with
            # FENCED_LEADER_EPOCH on every call for minutes (it kept the leader epoch it had cached). The next call
            # makes a new admin client, which reads the metadata again.
            error = exc.args[0] if exc.args else None
            if getattr(error, "code", lambda: None)() in self._stale_leader:
                self._admin = None
            raise
        finally:
            admin.poll(0)  # delivers the admin client's logs

    def highwater(self, topic: str, partition: int) -> int | None:
        """Last known end offset of an assigned partition (from its fetches), or None before the first fetch."""
        from confluent_kafka import TopicPartition

        try:
            high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)[1]
        except self._kafka_exception:
            return None
        return high if high >= 0 else None

    def position(self, topic: str, partition: int) -> int | None:
        """The next offset this consumer hands out, or None while it is not known (never blocks).

        librdkafka's own position once it has one (it moves past transaction
        markers too); before that (a partition with no record handed out since
        its assignment or a seek) the start offset set then.
        """
        from confluent_kafka import TopicPartition

        tp = (topic, partition)
        if tp not in self._assigned:
            return None
        try:
            offset = self._consumer.position([TopicPartition(topic, partition)])[0].offset
        except self._kafka_exception:
            offset = _OFFSET_INVALID
        if offset >= 0:
            self._starts.pop(tp, None)
            return offset
        return self._starts.get(tp)

    def fetch_state(self) -> str:
        """Best-effort description of the client's fetch state, for the log when fetching stalls."""
        return f"client=confluent-kafka (librdkafka), assigned={self.assignment()}, paused={sorted(self._paused)}"

    def assignment(self) -> list[TP]:
        return sorted(self._assigned)

    def pause(self, partitions: Iterable[TP]) -> None:
        tps = list(partitions)
        if self._assigning is not None:  # inside the assignment callback: paused once assigned
            self._pause_after_assign.update(tps)
            return
        if tps:
            from confluent_kafka import TopicPartition

            self._consumer.pause([TopicPartition(t, p) for t, p in tps])
            self._paused.update(tps)
            self._ever_paused.update(tps)

    def resume(self, partitions: Iterable[TP]) -> None:
        tps = list(partitions)
        if tps:
            from confluent_kafka import TopicPartition

            try:
                self._consumer.resume([TopicPartition(t, p) for t, p in tps])
            except self._kafka_exception as exc:  # a partition revoked meanwhile: nothing to resume
                log.debug("resume %s: %s", tps, exc)
            self._paused.difference_update(tps)
            self._ever_paused.difference_update(tps)

    def close(self) -> None:
        """Leave the group. Never commits, and runs none of the job's rebalance callbacks."""
        self._closing = True
        try:
            self._consumer.close()
        finally:
            self._assigned.clear()
            self._starts.clear()
