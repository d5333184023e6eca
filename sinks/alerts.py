"""Alert sinks: a Kafka topic, an HTTP webhook and an append-only JSONL file.

An alert is plain data with an ``id`` stable across replays; sinks drop an
alert whose id they have already delivered (the file sink remembers the ids
in its file, the Kafka sink those it sent in this process), so replaying the
same input never yields a second alert with a new id.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nlpstream.sinks import metrics
from nlpstream.sinks.errors import SinkWriteError


@dataclass(frozen=True, slots=True)
class Alert:
    """One fired alert rule.

    ``id``: stable hash of rule, key and triggering message id; ``rule``:
    the rule's name; ``kind``: ``message`` or ``window``; ``key``: the
    grouping key value (window rules); ``details``: numbers that fired it.
    """

    id: str
    rule: str
    kind: str
    topic: str
    partition: int
    offset: int
    message_id: str
    key: str | None
    event_time_ms: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)


class AlertSink(Protocol):
    """What the job needs from an alert sink."""

    def write(self, alerts: Sequence[Alert]) -> None: ...

    def seal(self) -> None:
        """Set aside what was written so far for :meth:`flush_sealed` (not while that runs)."""

    def flush_sealed(self) -> None:
        """Make the sealed alerts durable, maybe on another thread than ``write``'s; on error they stay sealed."""

    def flush(self) -> None:
        """``seal()`` then ``flush_sealed()``."""

    def close(self) -> None: ...


class _SeenIds:
    """A bounded set of alert ids already delivered (oldest forgotten first)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def add(self, alert_id: str) -> bool:
        """True when the id is new."""
        if alert_id in self._ids:
            return False
        self._ids[alert_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
        return True


class FileAlertSink:
    """Appends alerts as JSON lines; durable (fsynced) when flush returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seen = _SeenIds()
        metrics.ALERTS_SENT.labels("file")  # the series exists at 0 from start-up
        if self.path.exists():
            self._drop_torn_tail()
            with self.path.open(encoding="utf-8") as fh:
                for line in fh:
                    try:
                        self._seen.add(json.loads(line)["id"])
                    except (ValueError, KeyError, TypeError):
                        continue
        self._pending: list[Alert] = []  # written since the last seal
        self._sealed: list[Alert] = []  # set aside for the flush under way (or the one that failed)

    def _drop_torn_tail(self) -> None:
        """Cut a last line a crash left unfinished (its alert is sent again)."""
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    def write(self, alerts: Sequence[Alert]) -> None:
        self._pending.extend(a for a in alerts if self._seen.add(a.id))

    def seal(self) -> None:
        if self._pending:
            self._sealed.extend(self._pending)
            self._pending = []

    def flush(self) -> None:
        self.seal()
        self.flush_sealed()

    def flush_sealed(self) -> None:
        if not self._sealed:
            return
        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.writelines(a.to_json() + "\n" for a in self._sealed)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise SinkWriteError(f"cannot append alerts to {self.path}: {exc}") from exc
        metrics.ALERTS_SENT.labels("file").inc(len(self._sealed))
        self._sealed = []

    def close(self) -> None:
        self.flush()


class KafkaAlertSink:
    """Sends alerts to a Kafka topic, keyed by alert id; acknowledged when flush returns.

    ``producer`` is a ``kafka.KafkaProducer`` (or anything with ``send`` and
    ``flush``) owned by the caller. ``resend(producer, topic, sent,
    timeout_s)`` waits for the ``(message, future)`` pairs of a flush and
    sends again those that failed, raising the first failure
    (:func:`nlpstream.consumers.dlq.resend_failed`, which the job passes in:
    sinks and consumers do not import each other).
    """

    def __init__(self, producer: Any, topic: str, flush_timeout_s: float = 30.0, *,
                 resend: Callable[[Any, str, list[Any], float], Any]) -> None:
        self.producer = producer
        self.topic = topic
        self._resend = resend
        self.flush_timeout_s = flush_timeout_s
        self._seen = _SeenIds()
        metrics.ALERTS_SENT.labels("kafka")
        self._futures: list[Any] = []  # sent since the last seal
        self._sealed: list[Any] = []  # set aside for the flush under way (or the one that failed)

    def write(self, alerts: Sequence[Alert]) -> None:
        for alert in alerts:
            if self._seen.add(alert.id):
                message = {"key": alert.id.encode(), "value": alert.to_json().encode("utf-8")}
                self._futures.append((message, self.producer.send(self.topic, **message)))

    def seal(self) -> None:
        if self._futures:
            self._sealed.extend(self._futures)
            self._futures = []

    def flush(self) -> None:
        self.seal()
        self.flush_sealed()

    def flush_sealed(self) -> None:
        if not self._sealed:
            return
        try:
            self._resend(self.producer, self.topic, self._sealed, self.flush_timeout_s)
        except Exception as exc:  # noqa: BLE001 - kafka-python raises many types; translated here
            raise SinkWriteError(f"cannot deliver alerts to topic {self.topic!r}: {exc}") from exc
        metrics.ALERTS_SENT.labels("kafka").inc(len(self._sealed))
        self._sealed = []

    def close(self) -> None:
        self.flush()


class WebhookAlertSink:
    """POSTs each alert as JSON to an HTTP(S) endpoint; delivered when :meth:`flush` returns.

    The alert id travels in the ``Idempotency-Key`` header so receivers can
    drop repeats. Each request has a timeout; failures are retried with
    backoff up to ``retries`` times, then raise SinkWriteError (the job keeps
    the offsets uncommitted and tries again later). Secrets in ``headers``
    (e.g. an Authorization token) are never logged.
    """

    def __init__(self, url: str, headers: dict[str, str] | None = None, timeout_s: float = 10.0,
                 retries: int = 3, backoff_s: float = 0.5) -> None:
        self.url = url
        self.headers = dict(headers or {})
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._seen = _SeenIds()
        metrics.ALERTS_SENT.labels("webhook")
        self._pending: list[Alert] = []  # written since the last seal
        self._sealed: list[Alert] = []  # set aside for the flush under way (or the one that failed)

    def write(self, alerts: Sequence[Alert]) -> None:
        self._pending.extend(a for a in alerts if self._seen.add(a.id))

    def _post(self, alert: Alert) -> None:
        body = alert.to_json().encode("utf-8")
        headers = {"Content-Type": "application/json", "Idempotency-Key": alert.id, **self.headers}
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    if 200 <= response.status < 300:
                        return
                    last = SinkWriteError(f"webhook answered HTTP {response.status}")
            except urllib.error.HTTPError as exc:
                last = exc
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    break  # the receiver refuses this alert; retrying will not help
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            if attempt < self.retries:  # no wait after the last attempt
                time.sleep(self.backoff_s * (2**attempt))
        raise SinkWriteError(f"webhook delivery of alert {alert.id} failed: {last}")

    def seal(self) -> None:
        if self._pending:
            self._sealed.extend(self._pending)
            self._pending = []

    def flush(self) -> None:
        self.seal()
        self.flush_sealed()

    def flush_sealed(self) -> None:
        while self._sealed:
            self._post(self._sealed[0])
            self._sealed.pop(0)
            metrics.ALERTS_SENT.labels("webhook").inc()

    def close(self) -> None:
        self.flush()
