"""Alert rules evaluated on labeled rows, in input order.

Two rules:
- message: one message with the watched label at or above a score;
- window: per key (a JSON field such as ``customer`` or ``ticker``), the
  share of watched labels among the messages of the last ``window_seconds``
  of event time, once at least ``window_min_count`` messages are in it.
  It fires when the share reaches ``window_share`` and re-arms only after
  the share falls below it again.

With a multi-head model the rules can watch any head (``message_head``), and
``where`` keeps only the messages whose heads have given labels: for example
``message_head: sentiment`` and ``where: {topic: billing}`` alert on negative
billing messages and on customers whose billing messages turn negative.

Alert ids hash the rule, key and the triggering message id, so replaying the
same input yields the same ids, and sinks drop ids they already delivered.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from nlpstream.jobs.config import AlertConfig, ConfigError
from nlpstream.sinks import Alert


@dataclass(slots=True)  # not frozen: one per message, and a frozen __init__ costs ~2 us more
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
    heads: dict[str, tuple[str, float]] = field(default_factory=dict)  # further heads: name -> (label, score)


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
        self._first = ""  # the first head's name: its label and score are the message's own
        watched = f"{config.message_head}." if config.message_head else ""
        where = "".join(f"[{k}={v}]" for k, v in sorted(config.where.items()))
        self._rule_label = f"{where}{watched}{config.message_label}"

    def check_heads(self, names: Sequence[str]) -> None:
        """ConfigError unless every head the rules name is one of ``names`` (the model's heads, first the main one)."""
        self._first = names[0] if names else ""
        named = ([self.config.message_head] if self.config.message_head else []) + list(self.config.where)
        unknown = [n for n in named if n not in names]
        if unknown:
            known = ", ".join(repr(n) for n in names if n) or "none (a one-head model: leave message_head and where unset)"
            raise ConfigError(f"alerts name the head {unknown[0]!r}, but the model's heads are {known}")

    def _head(self, msg: LabeledMessage, name: str | None) -> tuple[str, float]:
        if not name or name == self._first:
            return msg.label, msg.score
        return msg.heads[name]

    def _matches(self, msg: LabeledMessage) -> bool:
        return all(self._head(msg, name)[0] == label for name, label in self.config.where.items())

    def needs_every_message(self) -> bool:
        """False when only a message that :meth:`may_fire` can fire an alert (no window rule, no ``where``
        filter, the watched head is the message's own): the job then hands :meth:`evaluate` only those."""
        cfg = self.config
        return (cfg.window_key_field is not None or bool(cfg.where)
                or (bool(cfg.message_head) and cfg.message_head != self._first))

    def may_fire(self, label: str, score: float) -> bool:
        """True when a message of this (own) label and score fires the message rule."""
        threshold = self.config.message_min_score
        # not (score < threshold): exactly the message rule's test, NaN included
        return threshold is not None and label == self.config.message_label and not score < threshold

    def evaluate(self, messages: list[LabeledMessage]) -> list[Alert]:
        """Alerts fired by ``messages`` (in order)."""
        alerts: list[Alert] = []
        for msg in messages:
            if self.config.where and not self._matches(msg):
                continue
            alerts.extend(self._message_rule(msg))
            alerts.extend(self._window_rule(msg))
        return alerts

    def _message_rule(self, msg: LabeledMessage) -> list[Alert]:
        threshold = self.config.message_min_score
        label, score = self._head(msg, self.config.message_head)
        if threshold is None or label != self.config.message_label or score < threshold:
            return []
        rule = f"message:{self._rule_label}>={threshold}"
        return [
            Alert(
                id=alert_id(rule, msg.message_id),
                rule=rule, kind="message", topic=msg.topic, partition=msg.partition, offset=msg.offset,
                message_id=msg.message_id, key=msg.key, event_time_ms=msg.event_time_ms,
                details={"label": label, "score": round(score, 4)},
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
        hit = self._head(msg, cfg.message_head)[0] == cfg.message_label
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
        rule = f"window:{cfg.window_key_field}:{self._rule_label}>={cfg.window_share}/{cfg.window_seconds:g}s"
        return [
            Alert(
                id=alert_id(rule, msg.key, msg.message_id),
                rule=rule, kind="window", topic=msg.topic, partition=msg.partition, offset=msg.offset,
                message_id=msg.message_id, key=msg.key, event_time_ms=msg.event_time_ms,
                details={"count": count, "hits": window.hits, "share": round(share, 4)},
            )
        ]
