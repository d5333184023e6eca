"""Plain data exchanged between the Kafka input and the job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# not frozen: a frozen dataclass's __init__ costs ~2 us more per object (object.__setattr__ per field),
# paid per message on the stream path; treat it as immutable
@dataclass(slots=True, unsafe_hash=True)
class InputRecord:
    """One Kafka record as polled, independent of kafka-python's types.

    ``timestamp_ms`` is the record's Kafka timestamp (CreateTime or
    LogAppendTime), ``headers`` the record headers in order.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes | None], ...] = ()


@dataclass(slots=True, unsafe_hash=True)  # not frozen: see InputRecord
class DecodedText:
    """A record that carries usable text.

    ``id`` follows the documented fallback: JSON id field, else the Kafka
    key, else ``topic-partition-offset``. ``fields`` keeps the other
    top-level scalar JSON fields (for alert keys such as ``customer``).
    """

    record: InputRecord
    id: str
    text: str
    fields: dict[str, Any] = field(default_factory=dict, compare=False)
