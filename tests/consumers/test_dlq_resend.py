"""The dead-letter queue's sealed flush on a fake producer: what is acknowledged, what is sent again."""

from __future__ import annotations

import pytest
from kafka.errors import KafkaTimeoutError

from nlpstream.consumers import InputRecord
from nlpstream.consumers.dlq import DeadLetterError, DeadLetterQueue, resend_failed
from nlpstream.sinks import Alert, KafkaAlertSink, SinkWriteError


class FakeFuture:
    def __init__(self, fail: bool) -> None:
        self.fail, self.is_done = fail, True

    def get(self, timeout=None):
        if self.fail:
            raise KafkaTimeoutError("Expiring 1 record(s): delivery timeout")
        return "metadata"


class FakeProducer:
    """Fails the sends of values in ``failing`` (as an expired batch does) until they are sent again."""

    def __init__(self, failing=()) -> None:
        self.failing, self.sends = set(failing), []

    def send(self, topic, key=None, value=None, **kw):
        self.sends.append(value)
        fail = value in self.failing
        self.failing.discard(value)  # the broker is back for the next send
        return FakeFuture(fail)

    def flush(self, timeout=None):
        pass


def _record(offset: int) -> InputRecord:
    return InputRecord("t", 0, offset, None, b"v%d" % offset, 1000)


def test_a_failed_dead_letter_is_sent_again_and_the_retry_waits_only_for_that():
    producer = FakeProducer(failing={b"v1"})
    dlq = DeadLetterQueue(None, "dlq", producer=producer)
    for offset in (0, 1, 2):
        dlq.send(_record(offset), "DecodeError:json", "bad")
    dlq.seal()
    dlq.send(_record(3), "DecodeError:json", "bad")  # queued while the sealed ones are flushed
    with pytest.raises(DeadLetterError, match="delivery timeout"):
        dlq.flush_sealed()
    assert producer.sends == [b"v0", b"v1", b"v2", b"v3", b"v1"], "only the failed one is sent again"
    assert dlq.flush_sealed() == 3, "the retry of the same sealed part succeeds once the new send is acknowledged"
    assert dlq.flush() == 1 and producer.sends.count(b"v1") == 2


def test_a_failed_kafka_alert_is_sent_again():
    alert = Alert("a1", "r", "message", "t", 0, 0, "m", None, 1)
    producer = FakeProducer(failing={alert.to_json().encode()})
    sink = KafkaAlertSink(producer, "alerts", resend=resend_failed)
    sink.write([alert])
    with pytest.raises(SinkWriteError):
        sink.flush()
    sink.flush()  # sent again, acknowledged
    assert len(producer.sends) == 2
