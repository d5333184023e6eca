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


def test_rules_can_watch_a_further_head_and_filter_on_heads():
    import pytest

    from nlpstream.jobs.config import ConfigError

    def tagged(i, sentiment, topic, score=0.99):
        return LabeledMessage("t", 0, i, f"m{i}", sentiment, score, 1000 * i, "acme", {"topic": (topic, 0.9)})

    # negative billing messages only: other topics never count, in the message or the window rule
    rules = AlertRules(window_config(message_min_score=0.95, where={"topic": "billing"}))
    rules.check_heads(["sentiment", "topic"])
    msgs = [tagged(i, "negative", "delivery") for i in range(6)] + [tagged(10 + i, "negative", "billing") for i in range(4)]
    alerts = rules.evaluate(msgs)
    assert [a.message_id for a in alerts if a.kind == "message"] == ["m10", "m11", "m12", "m13"]
    window = [a for a in alerts if a.kind == "window"]
    assert len(window) == 1 and window[0].message_id == "m13" and "[topic=billing]" in window[0].rule
    # the rules may watch the further head itself
    rules = AlertRules(AlertConfig(message_head="topic", message_label="billing", message_min_score=0.85))
    rules.check_heads(["sentiment", "topic"])
    assert [a.message_id for a in rules.evaluate([tagged(1, "positive", "billing"), tagged(2, "negative", "account")])] == ["m1"]
    # a head the model does not have: a clear configuration error before anything runs
    with pytest.raises(ConfigError, match="head 'topic'"):
        AlertRules(AlertConfig(where={"topic": "billing"})).check_heads([""])
    # one-head models keep their rule names (and so their alert ids)
    assert AlertRules(AlertConfig())._rule_label == "negative"


def test_only_messages_that_may_fire_reach_the_rules_when_no_rule_needs_every_message():
    """The stream job hands the rules only the messages ``may_fire`` lets through unless ``needs_every_message``;
    for a message-rule-only config that must fire exactly the alerts every message would."""
    import random

    random.seed(7)
    msgs = [msg(i, random.choice(["negative", "neutral", "positive"]), score=random.random()) for i in range(500)]
    message_only = AlertRules(AlertConfig(message_min_score=0.9))
    message_only.check_heads([""])
    assert not message_only.needs_every_message()
    kept = [m for m in msgs if message_only.may_fire(m.label, m.score)]
    assert 0 < len(kept) < len(msgs)
    assert message_only.evaluate(kept) == AlertRules(AlertConfig(message_min_score=0.9)).evaluate(msgs)
    assert not AlertRules(AlertConfig(message_min_score=None)).may_fire("negative", 1.0)
    nan = msg(999, "negative", score=float("nan"))  # the rule's own test lets it through: so must may_fire
    assert message_only.may_fire(nan.label, nan.score) == bool(message_only.evaluate([nan]))
    for needs in (window_config(), AlertConfig(where={"topic": "billing"}),
                  AlertConfig(message_head="topic", message_label="billing")):
        rules = AlertRules(needs)
        rules.check_heads(["sentiment", "topic"])
        assert rules.needs_every_message(), needs
    watched_first = AlertRules(AlertConfig(message_head="sentiment"))
    watched_first.check_heads(["sentiment", "topic"])
    assert not watched_first.needs_every_message()
