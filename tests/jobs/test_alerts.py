from nlpstream.jobs.alerts import AlertRules, LabeledMessage
from nlpstream.jobs.config import AlertConfig


def msg(i, label, key="acme", t=None, score=0.9):
    return LabeledMessage("t", 0, i, f"m{i}", label, score, t if t is not None else 1000 * i, key)


def window_config(**kw):
    base = dict(message_min_score=None, window_key_field="customer", window_seconds=60, window_min_count=4, window_share=0.75)
    base.update(kw)
    return AlertConfig(**base)


def test_message_rule_threshold():
    rules = AlertRules(AlertConfig(message_min_score=0.95))
    alerts = rules.evaluate([msg(1, "negative", score=0.96), msg(2, "negative", score=0.94), msg(3, "positive", score=0.99)])
    assert [a.message_id for a in alerts] == ["m1"]
    assert alerts[0].kind == "message"


def test_window_fires_once_per_burst_and_rearms():
    rules = AlertRules(window_config())
    burst = [msg(i, "negative") for i in range(10)]
    alerts = rules.evaluate(burst)
    assert len(alerts) == 1 and alerts[0].message_id == "m3" and alerts[0].key == "acme"
    calm = [msg(10 + i, "positive") for i in range(10)]
    assert rules.evaluate(calm) == []
    again = rules.evaluate([msg(20 + i, "negative", t=100_000 + 1000 * i) for i in range(10)])
    assert len(again) == 1 and again[0].id != alerts[0].id


def test_window_needs_min_count_and_share_and_expires():
    rules = AlertRules(window_config())
    assert rules.evaluate([msg(i, "negative") for i in range(3)]) == []
    # spread over more than the window: old events fall out, count never reaches 4
    rules = AlertRules(window_config())
    assert rules.evaluate([msg(i, "negative", t=i * 61_000) for i in range(10)]) == []
    rules = AlertRules(window_config())
    mixed = [msg(i, "negative" if i % 2 else "neutral") for i in range(20)]
    assert rules.evaluate(mixed) == []


def test_ids_are_stable_across_replays_and_keys_are_separate():
    burst = [msg(i, "negative", key="a") for i in range(5)] + [msg(5 + i, "negative", key="b") for i in range(5)]
    first = AlertRules(window_config()).evaluate(burst)
    second = AlertRules(window_config()).evaluate(burst)
    assert [a.id for a in first] == [a.id for a in second]
    assert {a.key for a in first} == {"a", "b"}


def test_messages_without_key_are_ignored_by_window():
    rules = AlertRules(window_config())
    assert rules.evaluate([msg(i, "negative", key=None) for i in range(10)]) == []
