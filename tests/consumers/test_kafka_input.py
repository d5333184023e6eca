"""Both stream consumers against the real broker: the contract the stream job relies on.

:class:`KafkaInput` (kafka-python) and :class:`ConfluentInput` (confluent-kafka,
``kafka.client: confluent``) run the same checks: positions and end offsets,
a start offset set by ``seek`` inside the assignment callback, a pause asked
for there, commits read back, and a close that runs no revocation callback.
"""

from __future__ import annotations

import time

import pytest

from nlpstream.consumers.client_config import ConnectionSettings
from nlpstream.consumers.confluent_input import ConfluentInput, librdkafka_config
from nlpstream.consumers.kafka_input import ConsumerSettings, KafkaInput
from tests.conftest import json_messages, produce

pytestmark = pytest.mark.kafka
CLIENTS = {"kafka-python": KafkaInput, "confluent": ConfluentInput}


def poll_until(source, n: int, timeout_s: float = 60) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += source.poll(timeout_s=0.5)
    return got


@pytest.mark.parametrize("client", CLIENTS)
def test_positions_and_end_offsets(kafka_bootstrap, make_topic, unique, client):
    topic = make_topic(unique, partitions=2)
    produce(kafka_bootstrap, topic, json_messages(7, prefix=unique), partition=0)
    produce(kafka_bootstrap, topic, json_messages(3, prefix=unique), partition=1)
    assigned: list = []
    source = CLIENTS[client](ConnectionSettings(kafka_bootstrap), ConsumerSettings((topic,), f"{unique}-g"),
                             assigned.extend, lambda _: None, lambda _: None)
    try:
        got = poll_until(source, 10)
        assert len(got) == 10 and sorted(assigned) == [(topic, 0), (topic, 1)]
        assert [r.offset for r in got if r.partition == 0] == list(range(7))
        assert all(r.value.startswith(b"{") and r.timestamp_ms > 0 and r.headers == () for r in got)
        assert source.assignment() == [(topic, 0), (topic, 1)]
        assert source.end_offsets([(topic, 0), (topic, 1)], timeout_s=5) == {(topic, 0): 7, (topic, 1): 3}
        assert source.beginning_offsets([(topic, 0), (topic, 1)], timeout_s=5) == {(topic, 0): 0, (topic, 1): 0}
        assert source.end_offsets([]) == {}
        assert (source.position(topic, 0), source.position(topic, 1)) == (7, 3)
        assert source.highwater(topic, 0) == 7
        assert source.position(topic, 5) is None  # not assigned: no answer, no exception
        assert "paused=[]" in source.fetch_state()
    finally:
        source.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_a_poll_hands_out_what_is_there_without_waiting_for_a_full_batch(kafka_bootstrap, make_topic, unique, client):
    """Three records, batches of 512 and a 30 s poll timeout: the poll returns them as soon as they are
    fetched (confluent's ``consume`` alone waits for a full batch or the timeout)."""
    topic = make_topic(unique, partitions=1)
    source = CLIENTS[client](ConnectionSettings(kafka_bootstrap), ConsumerSettings((topic,), f"{unique}-g"),
                             lambda _: None, lambda _: None, lambda _: None)
    try:
        deadline = time.monotonic() + 60
        while not source.assignment() and time.monotonic() < deadline:  # joined and assigned (the topic is empty)
            assert source.poll(timeout_s=0.5) == []
        assert source.assignment() == [(topic, 0)]
        produce(kafka_bootstrap, topic, json_messages(3, prefix=unique), partition=0)
        got: list = []
        started = time.monotonic()
        while len(got) < 3 and time.monotonic() - started < 60:
            got += source.poll(timeout_s=30.0, max_records=512)
        assert [r.offset for r in got] == [0, 1, 2]
        assert time.monotonic() - started < 29, "the poll waited out its timeout for a batch to fill"
    finally:
        source.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_seek_and_pause_in_the_assignment_callback_then_commit_and_close(kafka_bootstrap, make_topic, unique, client):
    """The job's assignment callback seeks where its files end (and pauses during a registry outage)."""
    topic = make_topic(unique, partitions=2)
    produce(kafka_bootstrap, topic, json_messages(10, prefix=unique), partition=0)
    produce(kafka_bootstrap, topic, json_messages(4, prefix=unique), partition=1)
    group = f"{unique}-g"
    revoked: list = []
    holder: dict = {}

    def on_assigned(tps):
        for t, p in tps:
            if p == 0:
                holder["source"].seek(t, p, 6)  # files end at offset 5: start at 6
            else:
                holder["source"].pause([(t, p)])

    source = holder["source"] = CLIENTS[client](ConnectionSettings(kafka_bootstrap), ConsumerSettings((topic,), group),
                                                on_assigned, revoked.extend, revoked.extend)
    try:
        got = poll_until(source, 4, timeout_s=30)
        assert [(r.partition, r.offset) for r in got] == [(0, 6), (0, 7), (0, 8), (0, 9)]
        assert f"paused=[('{topic}', 1)]" in source.fetch_state()
        assert source.poll(timeout_s=1.0) == []  # partition 1 stays paused
        source.resume([(topic, 1)])
        got = poll_until(source, 4, timeout_s=30)
        assert [(r.partition, r.offset) for r in got] == [(1, 0), (1, 1), (1, 2), (1, 3)]
        assert source.committed_offsets([(topic, 0), (topic, 1)]) == {(topic, 0): None, (topic, 1): None}
        assert source.commit({(topic, 0): 10, (topic, 1): 4}) is True
        assert source.commit({}) is True
        assert source.committed_offsets([(topic, 0), (topic, 1)]) == {(topic, 0): 10, (topic, 1): 4}
        assert source.committed(topic, 1) == 4
    finally:
        source.close()
    assert revoked == []  # close leaves the group without the job's callbacks: the job settles its own state
    # the next member of the group starts where the commits say
    again = CLIENTS[client](ConnectionSettings(kafka_bootstrap), ConsumerSettings((topic,), group),
                            lambda _: None, lambda _: None, lambda _: None)
    try:
        produce(kafka_bootstrap, topic, json_messages(1, prefix=f"{unique}-new"), partition=1)
        got = poll_until(again, 1, timeout_s=30)
        assert [(r.partition, r.offset) for r in got] == [(1, 4)]
    finally:
        again.close()


def test_librdkafka_settings_carry_security_and_hide_nothing_extra():
    conn = ConnectionSettings("a:9093, b:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                              sasl_username="u", sasl_password="secret", ssl_cafile="/ca.pem")
    conf = librdkafka_config(conn)
    assert conf == {"bootstrap.servers": "a:9093,b:9093", "security.protocol": "sasl_ssl", "client.id": "nlpstream",
                    "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "u", "sasl.password": "secret",
                    "ssl.ca.location": "/ca.pem"}
    assert "secret" not in repr(conn)


@pytest.mark.parametrize("client", CLIENTS)
def test_positions_are_known_before_any_record(kafka_bootstrap, make_topic, unique, client):
    """Caught-up partitions (committed at the end, empty, or sought to the end) report their position with no
    record handed out: the job's idle timer and fetch-stall guard read it."""
    topic = make_topic(unique, partitions=3)
    produce(kafka_bootstrap, topic, json_messages(3, prefix=unique), partition=0)
    produce(kafka_bootstrap, topic, json_messages(2, prefix=unique), partition=2)
    group = f"{unique}-g"
    first = CLIENTS[client](ConnectionSettings(kafka_bootstrap), ConsumerSettings((topic,), group),
                            lambda _: None, lambda _: None, lambda _: None)
    try:
        assert len(poll_until(first, 5)) == 5
        assert first.commit({(topic, 0): 3}) is True
    finally:
        first.close()
    holder: dict = {}

    def on_assigned(tps):
        holder["source"].seek(topic, 2, 2)  # the files hold partition 2 up to its end

    source = holder["source"] = CLIENTS[client](ConnectionSettings(kafka_bootstrap), ConsumerSettings((topic,), group),
                                                on_assigned, lambda _: None, lambda _: None)
    try:
        deadline = time.monotonic() + 30
        positions: tuple = ()
        while time.monotonic() < deadline:
            assert source.poll(timeout_s=0.5) == []
            positions = tuple(source.position(topic, p) for p in range(3))
            if len(source.assignment()) == 3 and None not in positions:
                break
        assert positions == (3, 0, 2)
        assert source.end_offsets([(topic, p) for p in range(3)]) == {(topic, 0): 3, (topic, 1): 0, (topic, 2): 2}
    finally:
        source.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_a_partition_paused_before_a_rebalance_is_fetched_once_assigned_again(kafka_bootstrap, make_topic, unique,
                                                                               client):
    """A new assignment starts unpaused (librdkafka keeps an application pause through a rebalance by itself)."""
    topic = make_topic(unique, partitions=2)
    group = f"{unique}-g"
    settings = ConsumerSettings((topic,), group, session_timeout_ms=6000)

    def member():
        return CLIENTS[client](ConnectionSettings(kafka_bootstrap), settings, lambda _: None, lambda _: None,
                               lambda _: None)

    def poll_while(members, done, timeout_s=60.0):
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            for m in members:
                assert m.poll(timeout_s=0.2) == []
        assert done()

    a = member()
    try:
        poll_while([a], lambda: len(a.assignment()) == 2)
        a.pause(a.assignment())
        b = member()
        try:
            poll_while([a, b], lambda: len(a.assignment()) == 1 and len(b.assignment()) == 1)
        finally:
            b.close()
        poll_while([a], lambda: len(a.assignment()) == 2)
        assert "paused=[]" in a.fetch_state()
        produce(kafka_bootstrap, topic, json_messages(3, prefix=unique), partition=0)
        produce(kafka_bootstrap, topic, json_messages(3, prefix=unique), partition=1)
        got = poll_until(a, 6, timeout_s=30)
        assert sorted((r.partition, r.offset) for r in got) == [(p, o) for p in (0, 1) for o in range(3)]
    finally:
        a.close()


def test_confluent_static_member_fenced_stops_with_a_consumer_error(kafka_bootstrap, make_topic, unique):
    """A second member with the same group.instance.id fences the first: librdkafka's fatal error ends its polls."""
    from nlpstream.consumers.errors import ConsumerError

    topic = make_topic(unique, partitions=1)
    settings = ConsumerSettings((topic,), f"{unique}-g", group_instance_id="pod-0", session_timeout_ms=6000)
    first = ConfluentInput(ConnectionSettings(kafka_bootstrap), settings, lambda _: None, lambda _: None,
                           lambda _: None)
    second = None
    try:
        deadline = time.monotonic() + 30
        while not first.assignment() and time.monotonic() < deadline:
            first.poll(timeout_s=0.2)
        assert first.assignment() == [(topic, 0)]
        second = ConfluentInput(ConnectionSettings(kafka_bootstrap), settings, lambda _: None, lambda _: None,
                                lambda _: None)
        deadline = time.monotonic() + 30
        while not second.assignment() and time.monotonic() < deadline:
            second.poll(timeout_s=0.2)
        assert second.assignment() == [(topic, 0)]
        with pytest.raises(ConsumerError, match="cannot go on"):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                first.poll(timeout_s=0.2)
    finally:
        first.close()
        if second is not None:
            second.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_a_commit_after_the_group_moved_on_is_refused_not_raised(kafka_bootstrap, make_topic, unique, client):
    """A member that stopped polling past max_poll_interval_ms lost its partitions: its commit returns False."""
    topic = make_topic(unique, partitions=1)
    produce(kafka_bootstrap, topic, json_messages(2, prefix=unique), partition=0)
    settings = ConsumerSettings((topic,), f"{unique}-g", session_timeout_ms=6000, max_poll_interval_ms=6000)

    def member():
        return CLIENTS[client](ConnectionSettings(kafka_bootstrap), settings, lambda _: None, lambda _: None,
                               lambda _: None)

    stale, other = member(), None
    try:
        assert len(poll_until(stale, 2)) == 2
        other = member()
        deadline = time.monotonic() + 60
        while other.assignment() != [(topic, 0)] and time.monotonic() < deadline:
            other.poll(timeout_s=0.5)  # the stale member does not poll: the group moves on without it
        assert other.assignment() == [(topic, 0)]
        assert stale.commit({(topic, 0): 2}) is False
        assert other.commit({(topic, 0): 1}) is True
        assert other.committed_offsets([(topic, 0)]) == {(topic, 0): 1}
    finally:
        stale.close()
        if other is not None:
            other.close()
