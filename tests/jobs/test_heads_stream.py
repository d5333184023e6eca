"""A two-head model in the stream job: both heads' columns in Parquet, read back with pyarrow (real broker)."""

from __future__ import annotations

import json

import pytest

from nlpstream.inference import load_engine
from nlpstream.jobs.config import AlertConfig
from nlpstream.jobs.stream import StreamJob
from tests.conftest import produce, read_output
from tests.jobs.test_stream_kafka import config

pytestmark = [pytest.mark.kafka, pytest.mark.model]

TEXTS = ["I was charged twice for my subscription this month.", "My parcel has been stuck at the depot for a week.",
         "The app crashes every time I open the settings page.", "I cannot log in, the reset code never arrives.",
         "The jacket's zip broke after two days.", "Thanks to the lovely staff at your Leeds store!"]


def test_two_heads_land_as_columns_and_drive_alerts(kafka_bootstrap, make_topic, unique, tmp_path, engine):
    topic = make_topic(unique, partitions=2)
    n = 60
    produce(kafka_bootstrap, topic, [(None, json.dumps({"id": f"{unique}-{i}", "text": f"{TEXTS[i % 6]} ({i})",
                                                        "customer": "c1"}).encode()) for i in range(n)])
    alerts_file = tmp_path / "alerts.jsonl"
    alerts = AlertConfig(alert_file=str(alerts_file), message_min_score=0.5, where={"topic": "billing"})
    with load_engine("builtin:sentiment,builtin:topic", devices="cpu", precision="fp32") as two:
        summary = StreamJob(config(kafka_bootstrap, topic, tmp_path / "out", idle_timeout=4.0, alerts=alerts),
                            engine=two).run()
        expected = {f"{unique}-{i}": p for i, p in enumerate(two.classify([f"{TEXTS[i % 6]} ({i})" for i in range(n)]))}
    assert summary.labeled == n
    table = read_output(tmp_path / "out")
    assert table.num_rows == n
    names = table.column_names
    assert names.index("topic_label") == names.index("score") + 1 and "topic_score" in names
    rows = table.to_pylist()
    for row in rows:
        p = expected[row["id"]]
        assert (row["label"], row["topic_label"]) == (p.label, p.heads["topic"].label)
        assert row["topic_score"] == pytest.approx(p.heads["topic"].score, abs=1e-5)
    assert {r["model"] for r in rows} == {"builtin:sentiment,builtin:topic"}
    by_text = {TEXTS[i % 6]: r["topic_label"] for i, r in ((int(r["id"].rsplit("-", 1)[1]), r) for r in rows)}
    assert by_text[TEXTS[0]] == "billing" and by_text[TEXTS[1]] == "delivery"
    # the message rule watches sentiment, only among billing messages
    fired = [json.loads(line) for line in alerts_file.read_text().splitlines()]
    billing = {r["id"] for r in rows if r["topic_label"] == "billing" and r["label"] == "negative"}
    assert billing and {a["message_id"] for a in fired if a["kind"] == "message"} == billing
    # the engine sentiment-only fixture labels the same texts the same way
    assert [p.label for p in engine.classify([f"{TEXTS[i % 6]} ({i})" for i in range(6)])] == \
        [expected[f"{unique}-{i}"].label for i in range(6)]
