"""How a Kafka record becomes a row or a dead letter: shared by the stream job and the Kafka backfill.

Pure helpers over plain data (no state): decoding a batch, the DLQ error
class and message of each kind of failure, and the output row of a labeled
record. Both jobs call these so that a record is decoded, dead-lettered and
written the same way whichever job reads it.
"""

from __future__ import annotations

from nlpstream.consumers import DecodeError, DecodeSettings, InputRecord, decode_record
from nlpstream.consumers.records import DecodedText
from nlpstream.inference import Prediction
from nlpstream.sinks import OutputRow

INFERENCE_REASON = "inference"  # the dead-letter reason of a text the model fails on alone


def decode_batch(records: list[InputRecord], settings: DecodeSettings
                 ) -> tuple[list[DecodedText], list[tuple[InputRecord, DecodeError]]]:
    """The records that carry usable text, and those that do not with why (in input order).

    Schema'd formats need every schema id of ``records`` resolved on
    ``settings.registry`` first.
    """
    good: list[DecodedText] = []
    undecodable: list[tuple[InputRecord, DecodeError]] = []
    for record in records:
        try:
            good.append(decode_record(record, settings))
        except DecodeError as exc:
            undecodable.append((record, exc))
    return good, undecodable


def decode_failure(exc: DecodeError) -> tuple[str, str, str]:
    """(DLQ error class header, DLQ message header, metrics reason) of a record that cannot be decoded."""
    return f"DecodeError:{exc.kind}", str(exc), exc.kind


def inference_failure(exc: BaseException) -> tuple[str, str, str]:
    """(DLQ error class header, DLQ message header, metrics reason) of a text the model fails on alone."""
    return type(exc).__name__, f"classification failed: {exc}", INFERENCE_REASON


def output_row(decoded: DecodedText, result: Prediction, processed_at_ms: int, model: str) -> OutputRow:
    """The output row of one labeled record: Kafka position, id, text, every head's label and score.

    The event time is the record's Kafka timestamp, or ``processed_at_ms`` when it has none.
    """
    rec = decoded.record
    more = getattr(result, "heads", None)
    heads = tuple((name, h.label, h.score) for name, h in more.items()) if more else ()
    return OutputRow(rec.topic, rec.partition, rec.offset, decoded.id, decoded.text, result.label, result.score,
                     rec.timestamp_ms or processed_at_ms, processed_at_ms, model, heads=heads)
