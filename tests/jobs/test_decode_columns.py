"""The stream job's column decode gives exactly what decoding record by record gives (no broker)."""

import itertools
import json

import pytest

from nlpstream.consumers import DecodeSettings, InputRecord
from nlpstream.consumers.records import DecodedText
from nlpstream.inference import Prediction
from nlpstream.sinks import OutputRow
from nlpstream.jobs.handling import decode_batch, decode_columns

VALUES = [
    b'{"id": "a1", "text": "hello", "customer": "acme", "n": 3}',
    b'{"id": 42, "text": "integer id", "customer": 7}',
    b'{"id": true, "text": "a bool is no id"}',
    b'{"id": "", "text": "empty id"}',
    b'{"text": "no id at all", "customer": [1, 2]}',
    b'{"id": "x", "text": "   "}',
    b'{"id": "x", "text": "\\u2003\\u00a0"}',  # blank in Unicode's sense
    b'{"id": "x"}',
    b'{"id": "x", "text": 5}',
    b'{"id": "x", "text": null}',
    b'{"id": "x", "text": "\xc3\xa9t\xc3\xa9 \xf0\x9f\x98\x80 \xd7\xa9\xd7\x9c\xd7\x95\xd7\x9d"}',
    b'{"id": "x", "other": "\xff", "text": "bad UTF-8 in a field the job does not read"}',
    b'{"id": "x", "other": NaN, "text": "NaN elsewhere"}',
    b'{"id": "x", "other": 1e400, "text": "huge number elsewhere"}',
    b'{"id": "x", "text": "first", "text": "last wins"}',
    b'\xef\xbb\xbf{"id": "bom", "text": "byte-order mark"}',
    b'["not", "an", "object"]',
    b'"a string"',
    b'{"id": "x", "text": "trailing"} x',
    b'{"id": "x", "text": "two"},{"id": "y", "text": "objects"}',
    b'',
    None,
    b'{"body": {"text": "nested"}, "body.text": "dotted key", "id": "d"}',
    b'  {"id": "ws", "text": "surrounded by whitespace"}  \n',
    b'{"id": ' + b"9" * 5000 + b', "text": "an integer id too long to print: the fallback id"}',
    b'{"id": -0, "text": "minus zero"}',
]


def _records(values):
    return [InputRecord("t", i % 2, i, None if i % 3 else f"k{i}".encode(), v, 1000 + i) for i, v in enumerate(values)]


def _same(records, settings):
    good, bad = decode_batch(records, settings)
    batch, undecodable = decode_columns(records, settings)
    assert batch.records == [d.record for d in good]
    assert batch.ids == [d.id for d in good]
    assert batch.texts == [d.text for d in good]
    assert [batch.fields_of(i) for i in range(len(batch))] == [d.fields for d in good]
    assert [(r, e.kind, str(e)) for r, e in undecodable] == [(r, e.kind, str(e)) for r, e in bad]
    return batch


SETTINGS = [
    DecodeSettings(keep_fields=()),
    DecodeSettings(keep_fields=("customer", "n", "text", "id")),
    DecodeSettings(keep_fields=None),
    DecodeSettings(text_field="body.text", keep_fields=()),
    DecodeSettings(text_field="text", id_field="text", keep_fields=("customer",)),
    DecodeSettings(input_format="text", keep_fields=()),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.input_format}-{s.text_field}-{s.id_field}-{s.keep_fields}")
def test_every_value_alone_in_pairs_and_all_together_decodes_as_record_by_record(settings):
    records = _records(VALUES)
    _same(records, settings)
    for record in records:
        _same([record], settings)
    for pair in itertools.combinations(records, 2):
        _same(list(pair), settings)


def test_a_batch_of_good_objects_takes_the_column_path_and_keeps_the_alert_fields():
    values = [json.dumps({"id": f"m{i}", "text": f"text {i}", "customer": f"c{i % 3}", "skip": {"deep": [i]}}).encode()
              for i in range(50)]
    records = _records(values)
    batch = _same(records, DecodeSettings(keep_fields=("customer",)))
    assert not isinstance(batch._fields[0], dict), "good JSON objects are decoded as structs, not dicts"
    assert batch.fields_of(4) == {"customer": "c1"}
    picked = batch.select([1, 4])
    assert picked.ids == ["m1", "m4"] and picked.fields_of(1) == {"customer": "c1"}


def test_labeled_columns_hold_what_output_row_gives_record_by_record():
    """The rows' Arrow table of a batch equals the rows ``output_row`` builds one record at a time: two topics,
    a record without a Kafka timestamp, a NaN score, a further head."""
    from types import SimpleNamespace

    from nlpstream.jobs.handling import labeled_columns
    from nlpstream.sinks.chunks import rows_chunk

    records = [InputRecord("a", 0, 5, None, b'{"id": "x", "text": "one"}', 1_700_000_000_000),
               InputRecord("b", 2, 9, None, b'{"id": "y", "text": "two"}', 0)]
    results = [SimpleNamespace(label="positive", score=0.75, heads={"topic": SimpleNamespace(label="billing", score=0.5)}),
               SimpleNamespace(label="negative", score=float("nan"),
                               heads={"topic": SimpleNamespace(label="account", score=0.25)})]
    good, bad = decode_columns(records, DecodeSettings(keep_fields=()))
    assert not bad
    got = labeled_columns(good, results, 1_800_000_000_000, "m")
    good_rows, _ = decode_batch(records, DecodeSettings(keep_fields=()))
    want = rows_chunk([output_row(d, r, 1_800_000_000_000, "m") for d, r in zip(good_rows, results)])
    assert got.chunk.schema == want.schema
    assert str(got.chunk.to_pylist()) == str(want.to_pylist())  # str: NaN equals itself
    assert got.labels == ["positive", "negative"] and list(got.event_times) == [1_700_000_000_000, 1_800_000_000_000]
    assert got.heads == {"topic": (["billing", "account"], [0.5, 0.25])}


def output_row(decoded: DecodedText, result: Prediction, processed_at_ms: int, model: str) -> OutputRow:
    """The reference: the output row of one labeled record, built as the job built each row before columns.

    Kafka position, id, text, every head's label and score; the event time is the record's Kafka timestamp,
    or ``processed_at_ms`` when it has none.
    """
    rec = decoded.record
    more = getattr(result, "heads", None)
    heads = tuple((name, h.label, h.score) for name, h in more.items()) if more else ()
    return OutputRow(rec.topic, rec.partition, rec.offset, decoded.id, decoded.text, result.label, result.score,
                     rec.timestamp_ms or processed_at_ms, processed_at_ms, model, heads=heads)
