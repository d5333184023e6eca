"""Wire-format decoding with an in-memory registry client (the real registry is in tests/jobs/test_registry_kafka.py)."""

from __future__ import annotations

import base64
import io
import json
import struct
from dataclasses import dataclass, field

import pytest

from nlpstream.consumers import DecodeError, DecodeSettings, InputRecord, decode_record
from nlpstream.consumers.schema_registry import (RegistryDecoder, SchemaRegistryUnavailable, _message_indexes,
                                                 schema_id_of)

AVRO = {"type": "record", "name": "Ticket", "namespace": "t", "fields": [
    {"name": "id", "type": "string"},
    {"name": "body", "type": {"type": "record", "name": "Body", "fields": [{"name": "text", "type": "string"}]}},
    {"name": "priority", "type": "int"},
]}
JSON_SCHEMA = {"type": "object", "properties": {"id": {"type": "string"}, "body": {"type": "object", "properties": {
    "text": {"type": "string"}}, "required": ["text"]}}, "required": ["id", "body"]}
PROTO = """syntax = "proto3";
package t;
import "google/protobuf/timestamp.proto";
message Envelope {
  message Body { string text = 1; }
  string id = 1;
  Body body = 2;
  google.protobuf.Timestamp at = 3;
}
message Other { int32 n = 1; }
"""


@dataclass
class _Schema:
    schema_str: str
    schema_type: str
    references: list = field(default_factory=list)


def _not_found(message: str, code: int = 40403) -> Exception:
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    return SchemaRegistryError(404, code, message)


class FakeClient:
    """In-memory stand-in for confluent-kafka's SchemaRegistryClient (get_schema by id only)."""

    def __init__(self, schemas: dict[int, _Schema]) -> None:
        self.schemas = schemas
        self.down = False
        self.calls = 0

    def get_schema(self, schema_id: int) -> _Schema:
        self.calls += 1
        if self.down:
            raise ConnectionError("connection refused")
        if schema_id not in self.schemas:
            raise _not_found(f"schema {schema_id} not found", 40403 if self.down is not None else -1)
        return self.schemas[schema_id]


def frame(schema_id: int, payload: bytes) -> bytes:
    return struct.pack(">bI", 0, schema_id) + payload


def record(value: bytes, offset: int = 0) -> InputRecord:
    return InputRecord(topic="t", partition=0, offset=offset, key=None, value=value, timestamp_ms=0, headers=())


def avro_bytes(obj: dict) -> bytes:
    import fastavro

    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(AVRO), obj)
    return buf.getvalue()


def decoder(fmt: str, schemas: dict[int, _Schema]) -> tuple[RegistryDecoder, FakeClient]:
    client = FakeClient(schemas)
    return RegistryDecoder(fmt, "http://registry.invalid", client=client), client


def settings(dec: RegistryDecoder, text_field: str = "body.text") -> DecodeSettings:
    return DecodeSettings(dec.input_format, text_field, "id", registry=dec)


def reason(value: bytes, s: DecodeSettings) -> str:
    with pytest.raises(DecodeError) as failure:
        decode_record(record(value), s)
    return failure.value.kind


def test_avro_nested_text_field_and_every_bad_kind():
    dec, client = decoder("avro", {1: _Schema(json.dumps(AVRO), "AVRO"), 2: _Schema(PROTO, "PROTOBUF")})
    good = frame(1, avro_bytes({"id": "T-1", "body": {"text": "My card was charged twice"}, "priority": 2}))
    values = [good, frame(7, b"\x00"), frame(2, b"\x00"), b"{not framed}", frame(1, b"\x02")]
    assert dec.unresolved(values) == {1, 7, 2}
    dec.resolve(dec.unresolved(values))
    assert dec.unresolved(values) == set() and client.calls == 3
    s = settings(dec)
    decoded = decode_record(record(good), s)
    assert (decoded.id, decoded.text) == ("T-1", "My card was charged twice")
    assert decoded.fields["priority"] == 2
    assert reason(b"{not framed}", s) == "no_magic_byte"
    assert reason(b"\x00\x00", s) == "no_magic_byte"  # too short for a schema id
    assert reason(frame(7, b"\x00"), s) == "unknown_schema_id"
    assert reason(frame(2, b"\x00"), s) == "schema_mismatch"  # a Protobuf schema on an Avro input
    assert reason(frame(1, b"\x02"), s) == "schema_mismatch"  # truncated record
    assert reason(good + b"\x00\x00", s) == "schema_mismatch"  # bytes left over
    assert reason(good, settings(dec, "body.missing")) == "missing_text"
    assert reason(good, settings(dec, "priority")) == "text_not_string"


def test_registry_outage_is_no_verdict_on_the_records():
    dec, client = decoder("avro", {1: _Schema(json.dumps(AVRO), "AVRO")})
    client.down = True
    with pytest.raises(SchemaRegistryUnavailable, match="did not answer for schema id 1"):
        dec.resolve({1})
    assert dec.unresolved([frame(1, b"")]) == {1}  # still to fetch: nothing was marked unknown
    client.down = False
    dec.resolve({1})
    value = frame(1, avro_bytes({"id": "a", "body": {"text": "hello"}, "priority": 1}))
    assert decode_record(record(value), settings(dec)).text == "hello"
    assert schema_id_of(value) == 1 and schema_id_of(b"x") is None


def test_json_schema_validates_each_record():
    dec, _ = decoder("json-schema", {5: _Schema(json.dumps(JSON_SCHEMA), "JSON")})
    dec.resolve({5})
    s = settings(dec)
    ok = frame(5, json.dumps({"id": "j1", "body": {"text": "Shares jumped"}}).encode())
    assert decode_record(record(ok), s).text == "Shares jumped"
    assert reason(frame(5, json.dumps({"id": "j2", "body": {}}).encode()), s) == "schema_mismatch"
    assert reason(frame(5, b"{oops"), s) == "schema_mismatch"


def _proto_classes():
    from google.protobuf import descriptor_pool, message_factory

    from nlpstream.consumers.schema_registry import _descriptor_protos, _well_known_missing

    files = _descriptor_protos(9, PROTO, [])
    pool = descriptor_pool.DescriptorPool()
    for f in _well_known_missing(files) + files:
        pool.Add(f)
    envelope = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Envelope"))
    body = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Envelope.Body"))
    other = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Other"))
    return files[-1], envelope, body, other


def test_protobuf_from_proto_text_and_from_a_serialized_descriptor_with_message_indexes():
    own, envelope, body, other = _proto_classes()
    msg = envelope(id="p1")
    msg.body.text = "Delivery is late again"
    msg.at.seconds = 1_700_000_000
    as_text = _Schema(PROTO, "PROTOBUF")
    as_base64 = _Schema(base64.b64encode(own.SerializeToString()).decode(), "PROTOBUF")
    for schemas in ({3: as_text}, {3: as_base64}):
        dec, _ = decoder("protobuf", schemas)
        dec.resolve({3})
        s = settings(dec)
        first = frame(3, b"\x00" + msg.SerializeToString())  # a single 0: the first message of the file
        assert decode_record(record(first), s).text == "Delivery is late again"
        explicit = frame(3, b"\x02\x00" + msg.SerializeToString())  # count 1, index 0 (zigzag varints)
        assert decode_record(record(explicit), s).id == "p1"
        nested = frame(3, b"\x04\x00\x00" + body(text="only the body").SerializeToString())  # [0, 0]: Envelope.Body
        assert decode_record(record(nested), settings(dec, "text")).text == "only the body"
        second = frame(3, b"\x02\x02" + other(n=5).SerializeToString())  # [1]: Other
        assert reason(second, s) == "missing_text"
        assert reason(frame(3, b"\x02\x08"), s) == "schema_mismatch"  # no 5th message
        assert reason(frame(3, b"\x00\xff\xff"), s) == "schema_mismatch"  # not a protobuf message


def test_message_indexes_decoding():
    assert _message_indexes(b"\x00rest") == ((0,), 1)
    assert _message_indexes(b"\x04\x02\x06") == ((1, 3), 3)
    with pytest.raises(ValueError):
        _message_indexes(b"\x04\x02")


def test_json_schema_2020_12_goes_through_jsonschema_and_draft_7_through_the_compiled_validator():
    from nlpstream.consumers.schema_registry import _fast_validator

    modern = {**JSON_SCHEMA, "$schema": "https://json-schema.org/draft/2020-12/schema"}
    assert _fast_validator(modern) is None
    assert _fast_validator({**JSON_SCHEMA, "$schema": "http://json-schema.org/draft-07/schema#"}) is not None
    dec, _ = decoder("json-schema", {6: _Schema(json.dumps(modern), "JSON")})
    dec.resolve({6})
    s = settings(dec)
    assert decode_record(record(frame(6, json.dumps({"id": "a", "body": {"text": "ok"}}).encode())), s).text == "ok"
    assert reason(frame(6, json.dumps({"id": "b", "body": {"text": 5}}).encode()), s) == "schema_mismatch"
    assert reason(frame(6, json.dumps({"id": 1, "body": {"text": "x"}}).encode()), s) == "schema_mismatch"


def test_a_404_that_is_not_schema_not_found_is_an_outage_not_an_unknown_id():
    """A wrong base path or a proxy answering 404 must not dead-letter the topic as unknown ids."""
    dec, client = decoder("avro", {})
    client.down = None  # answers every id with a 404 that carries no Confluent 'schema not found' code
    with pytest.raises(SchemaRegistryUnavailable, match="ccompat"):
        dec.resolve({1})
    assert dec.unresolved([frame(1, b"")]) == {1}
    client.down = False
    dec.resolve({1})  # a real 40403
    assert reason(frame(1, b""), settings(dec)) == "unknown_schema_id"


def test_a_record_that_makes_a_decoder_raise_anything_is_a_mismatch_not_a_crash():
    from nlpstream.consumers.schema_registry import _Schema as Built

    dec, _ = decoder("avro", {1: _Schema(json.dumps(AVRO), "AVRO")})
    dec.resolve({1})

    def explode(payload):
        raise TypeError("an Any of a type the pool does not know")

    dec._schemas[1] = Built(explode)
    assert reason(frame(1, b"\x00"), settings(dec)) == "schema_mismatch"


def test_protobuf_importing_google_type_and_confluent_meta_compiles():
    text = """syntax = "proto3";
package t;
import "google/type/date.proto";
import "confluent/meta.proto";
message Review {
  string text = 1 [(confluent.field_meta).doc = "the review"];
  google.type.Date day = 2;
  string id = 3;
}
"""
    from google.protobuf import descriptor_pool, message_factory

    from nlpstream.consumers.schema_registry import _descriptor_protos, _well_known_missing

    files = _descriptor_protos(11, text, [])
    pool = descriptor_pool.DescriptorPool()
    for f in _well_known_missing(files) + files:
        pool.Add(f)
    review = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Review"))
    msg = review(text="Great support", id="r1")
    msg.day.year = 2026
    for schema_str in (text, base64.b64encode(files[-1].SerializeToString()).decode()):
        dec, _ = decoder("protobuf", {11: _Schema(schema_str, "PROTOBUF")})
        dec.resolve({11})
        decoded = decode_record(record(frame(11, b"\x00" + msg.SerializeToString())), settings(dec, "text"))
        assert (decoded.text, decoded.id) == ("Great support", "r1")
        blank = review(id="r2")  # proto3 leaves an empty string out of the wire: still a blank text, not missing
        assert reason(frame(11, b"\x00" + blank.SerializeToString()), settings(dec, "text")) == "blank_text"


def test_json_schema_defaults_are_not_filled_in():
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
              "properties": {"text": {"type": "string", "default": "filled in"}}}
    dec, _ = decoder("json-schema", {4: _Schema(json.dumps(schema), "JSON")})
    dec.resolve({4})
    assert reason(frame(4, b'{"id": "x"}'), settings(dec, "text")) == "missing_text"
