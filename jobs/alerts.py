"""Alert rules evaluated on labeled rows, in input order.

Two rules:
- message: one message with the watched label at or above a score;
- window: per key (a JSON field such as ``customer`` or ``ticker``), the
  share of watched labels among the messages of the last ``window_seconds``
  of event time, once at least ``window_min_count`` messages are in it.
  It fires when the share reaches ``window_share`` and re-arms only after
  the share falls below it again.

Alert ids hash the rule, key and the triggering message id, so replaying the
same input yields the same ids, and sinks drop ids they already delivered.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass

from nlpstream.jobs.config import AlertConfig
from nlpstream.sinks import Alert


@dataclass(frozen=True, slots=True)
class LabeledMessage:
    """What the rules see of one labeled message."""

    topic: str
    partition: int
    offset: int
    message_id: str
    label: str
    score: float
    event_time_ms: int
    key: str | None


def alert_id(*parts: str) -> str:
    """A short stable id from the parts."""
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:24]


class _KeyWindow:
    __slots__ = ("events", "hits", "firing")

    def __init__(self) -> None:
        self.events: deque[tuple[int, bool]] = deque()
        self.hits = 0
        self.firing = False


class AlertRules:
    """Stateful evaluator; memory is bounded by ``max_keys`` windows (LRU)."""

    def __init__(self, config: AlertConfig, max_keys: int = 100_000) -> None:
        self.config = config
        self.max_keys = max_keys
        self._windows: OrderedDict[str, _KeyWindow] = OrderedDict()

    def evaluate(self, messages: list[LabeledMessage]) -> list[Alert]:
        """Alerts fired by ``messages`` (in order)."""
        alerts: list[Alert] = []
        for msg in messages:
            alerts.extend(self._message_rule(msg))
            alerts.extend(self._window_rule(msg))
        return alerts

    def _message_rule(self, msg: LabeledMessage) -> list[Alert]:
        threshold = self.config.message_min_score
        if threshold is None or msg.label != self.config.message_label or msg.score < threshold:
            return []
        rule = f"message:{self.config.message_label}>={threshold}"
        return [
            Alert(
                id=alert_id(rule, msg.message_id),
                rule=rule, kind="message", topic=msg.topic, partition=msg.partition, offset=msg.offset,
                message_id=msg.message_id, key=msg.key, event_time_ms=msg.event_time_ms,
                details={"label": msg.label, "score": round(msg.score, 4)},
            )
        ]

    def _window_rule(self, msg: LabeledMessage) -> list[Alert]:
        cfg = self.config
        if cfg.window_key_field is None or msg.key is None:
            return []
        window = self._windows.get(msg.key)
        if window is None:
            window = self._windows[msg.key] = _KeyWindow()
            if len(self._windows) > self.max_keys:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(msg.key)
        hit = msg.label == cfg.message_label
        window.events.append((msg.event_time_ms, hit))
        window.hits += hit
        horizon = msg.event_time_ms - int(cfg.window_seconds * 1000)
        while window.events and window.events[0][0] <= horizon:
            _, old_hit = window.events.popleft()
            window.hits -= old_hit
        count = len(window.events)
        share = window.hits / count
        if count < cfg.window_min_count or share < cfg.window_share:
            if share < cfg.window_share:
                window.firing = False
            return []
        if window.firing:
            return []
        window.firing = True
        rule = f"window:{cfg.window_key_field}:{cfg.message_label}>={cfg.window_share}/{cfg.window_seconds:g}s"
        return [
            Alert(
                id=alert_id(rule, msg.key, msg.message_id),
                rule=rule, kind="window", topic=msg.topic, partition=msg.partition, offset=msg.offset,
                message_id=msg.message_id, key=msg.key, event_time_ms=msg.event_time_ms,
                details={"count": count, "hits": window.hits, "share": round(share, 4)},
            )
        ]
