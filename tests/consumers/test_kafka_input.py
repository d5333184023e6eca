"""KafkaInput against the real broker: positions and end offsets the stream job's guards rely on."""

from __future__ import annotations

import time

import pytest

from nlpstream.consumers.client_config import ConnectionSettings
from nlpstream.consumers.kafka_input import ConsumerSettings, KafkaInput
from tests.conftest import json_messages, produce

pytestmark = pytest.mark.kafka


def test_positions_and_end_offsets(kafka_bootstrap, make_topic, unique):
    topic = make_topic(unique, partitions=2)
    produce(kafka_bootstrap, topic, json_messages(7, prefix=unique), partition=0)
    produce(kafka_bootstrap, topic, json_messages(3, prefix=unique), partition=1)
    assigned: list = []
    source = KafkaInput(ConnectionSettings(kafka_bootstrap), ConsumerSettings((topic,), f"{unique}-g"),
                        assigned.extend, lambda _: None, lambda _: None)
    try:
        got = []
        deadline = time.monotonic() + 60
        while len(got) < 10 and time.monotonic() < deadline:
            got += source.poll(timeout_s=0.5)
        assert len(got) == 10 and sorted(assigned) == [(topic, 0), (topic, 1)]
        assert source.end_offsets([(topic, 0), (topic, 1)], timeout_s=5) == {(topic, 0): 7, (topic, 1): 3}
        assert source.end_offsets([]) == {}
        assert (source.position(topic, 0), source.position(topic, 1)) == (7, 3)
        assert source.position(topic, 5) is None  # not assigned: no answer, no exception
        assert "paused=[]" in source.fetch_state()
    finally:
        source.close()
