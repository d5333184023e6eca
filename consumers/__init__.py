"""Kafka input for nlpstream: consumer wrapper, decoding, dead-letter routing,
rebalance hooks and a local broker launcher for development and tests.

This package knows nothing of models or sinks; it hands plain frozen
dataclasses to the job.
"""

from nlpstream.consumers.decode import DecodeSettings, decode_record
from nlpstream.consumers.errors import ConsumerError, DecodeError, KafkaLocalError
from nlpstream.consumers.records import DecodedText, InputRecord

__all__ = [
    "ConsumerError",
    "DecodeError",
    "DecodeSettings",
    "DecodedText",
    "InputRecord",
    "KafkaLocalError",
    "decode_record",
]
