"""Kafka input for nlpstream: consumer wrapper, decoding, dead-letter routing,
rebalance hooks and a local broker launcher for development and tests.

This package knows nothing of models or sinks; it hands plain frozen
dataclasses to the job.
"""

from consumers.decode import DecodeSettings, decode_record
from consumers.errors import ConsumerError, DecodeError, KafkaLocalError
from consumers.records import DecodedText, InputRecord

__all__ = [
    "ConsumerError",
    "DecodeError",
    "DecodeSettings",
    "DecodedText",
    "InputRecord",
    "KafkaLocalError",
    "decode_record",
]
