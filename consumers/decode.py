"""Turn Kafka record values into text, or a DecodeError that names why not.

Valid but unusual text (very long, emoji, right-to-left scripts, NUL
characters) is accepted; only values that carry no usable text are refused.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from nlpstream.consumers.errors import DecodeError
from nlpstream.consumers.records import DecodedText, InputRecord

InputFormat = Literal["text", "json", "avro", "json-schema", "protobuf"]
_MISSING = object()
MISSING = _MISSING  # a field the object does not have
_FAST_JSON = msgspec.json.Decoder()  # see decode_record
_FAST_JSON_FAILS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


@dataclass(frozen=True, slots=True)
class DecodeSettings:
    """How record values are read: plain UTF-8 text, a JSON object, or a schema'd record (Confluent wire format).

    ``text_field`` and ``id_field`` are keys of the object or dotted paths
    into nested objects (``body.text``); a key that itself contains dots wins.
    ``registry`` decodes the schema'd formats (``avro``, ``json-schema``,
    ``protobuf``) and is required for them. ``keep_fields`` names the
    fields kept in :attr:`DecodedText.fields` (the stream job keeps only its
    alert key fields); None keeps every top-level scalar field.
    """

    input_format: InputFormat = "json"
    text_field: str = "text"
    id_field: str = "id"
    registry: Any = None  # a schema_registry.RegistryDecoder for the schema'd formats
    keep_fields: tuple[str, ...] | None = None  # DecodedText.fields: these only (None: every top-level scalar)


def field_at(obj: Any, path: str) -> Any:
    """``obj[path]``, else the value at the dotted ``path`` through nested objects; ``_MISSING`` when absent."""
    if isinstance(obj, dict) and path in obj:
        return obj[path]
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


def id_text(raw: Any) -> str | None:
    """The message id a JSON id field gives: a string, or an integer's decimal digits; None for anything else,
    an empty string, or an integer longer than Python prints (4,300 digits): the record takes the fallback id."""
    if isinstance(raw, (str, int)) and not isinstance(raw, bool):
        try:
            return str(raw) or None
        except ValueError:  # int too long to convert (sys.get_int_max_str_digits)
            return None
    return None


def _fallback_id(record: InputRecord) -> str:
    if record.key is not None:
        try:
            key = record.key.decode("utf-8")
        except UnicodeDecodeError:
            key = record.key.hex()
        if key:
            return key
    return f"{record.topic}-{record.partition}-{record.offset}"


def _scalar_fields(obj: dict[str, Any], skip: str) -> dict[str, Any]:
    return {
        k: v
        for k, v in obj.items()
        if k != skip and isinstance(v, (str, int, float, bool))
    }


def decode_record(record: InputRecord, settings: DecodeSettings) -> DecodedText:
    """Decode one record.

    Returns the text and id; raises :class:`DecodeError` (never anything
    else) when the value is null/empty, not UTF-8, not a JSON object, or its
    text field is missing, not a string or blank.

    JSON values without a registry are parsed by msgspec first (~6x the
    standard library on a short chat message), with the same result and the
    same error for every value: msgspec only refuses where the standard
    library might accept (``NaN``, ``1e400``, lone ``\\ud800`` escapes, invalid
    UTF-8, a byte-order mark, malformed JSON) and never accepts what it
    refuses, keeps integers of any size and rounds floats the same way;
    whatever it refuses, or that is not an object, takes the standard
    library's path with its exact error. The one edge where they may differ
    is a value nested ~990 levels deep, where both stop at the interpreter's
    recursion limit a few levels apart (and where the standard library stops
    already moves with the caller's stack).
    """
    value = record.value
    if value and settings.input_format == "json" and settings.registry is None:
        try:
            obj = _FAST_JSON.decode(value)
        except _FAST_JSON_FAILS:
            obj = None
        if type(obj) is dict:
            return _from_object(record, obj, settings, "JSON object")
    return _decode_stdlib(record, settings)


@functools.lru_cache(maxsize=16)
def _fields_decoder(names: tuple[str, ...]) -> msgspec.json.Decoder:
    """Decodes a JSON object into a struct of ``names`` only (attributes ``f0``, ``f1``...; absent: ``MISSING``)."""
    struct = msgspec.defstruct("Fields", [(f"f{i}", object, _MISSING) for i in range(len(names))],
                               rename={f"f{i}": name for i, name in enumerate(names)})
    return msgspec.json.Decoder(struct)


def fast_json_fields(values: list[bytes | None], names: tuple[str, ...]) -> list[Any] | None:
    """Top-level fields ``names`` of every value (attributes ``f0``, ``f1``... in that order of one struct per
    value, ``MISSING`` where absent), when every value is a JSON
    object that :func:`decode_record` decodes without error; else None (decode each record instead).

    One msgspec struct decode per value, without building the objects' other
    fields. msgspec skips the other fields without checking their strings'
    UTF-8, so the values are checked in one go here (ASCII, else a strict
    decode: a value that fails makes this return None, and the record's own
    decode names the error). Values are whole JSON objects once decoded, so
    they start and end with ASCII and joining them cannot hide a bad byte.
    """
    decode = _fields_decoder(names).decode
    try:
        objs = list(map(decode, values))  # type: ignore[arg-type]
    except (*_FAST_JSON_FAILS, TypeError):
        return None
    joined = b"".join(values)  # type: ignore[arg-type]
    if not joined.isascii():
        try:
            joined.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return objs


def _parse_int(digits: str) -> int | float:
    """A JSON integer; one longer than Python converts to ``int`` (4,300 digits) is read as a float (``inf``),
    as ``1e400`` is: the record is not refused for a number in a field the job may not even read."""
    try:
        return int(digits)
    except ValueError:
        return float(digits)


def _decode_stdlib(record: InputRecord, settings: DecodeSettings) -> DecodedText:
    """:func:`decode_record` with the standard library's JSON parser only: every error kind and message."""
    if record.value is None or len(record.value) == 0:
        raise DecodeError("empty_value", "record value is null or empty")
    if settings.registry is not None:
        obj = settings.registry.decode(record.value)
        if not isinstance(obj, dict):
            raise DecodeError("not_an_object", f"the record is a {type(obj).__name__}, expected an object")
        return _from_object(record, obj, settings, "record")
    try:
        raw = record.value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError("invalid_utf8", f"value is not valid UTF-8: {exc.reason} at byte {exc.start}") from exc
    if settings.input_format == "text":
        if not raw.strip():
            raise DecodeError("blank_text", "text is blank")
        return DecodedText(record=record, id=_fallback_id(record), text=raw)
    try:
        obj = json.loads(raw, parse_int=_parse_int)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise DecodeError("malformed_json", f"value is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise DecodeError("not_an_object", f"JSON value is a {type(obj).__name__}, expected an object")
    return _from_object(record, obj, settings, "JSON object")


def _from_object(record: InputRecord, obj: dict[str, Any], settings: DecodeSettings, what: str) -> DecodedText:
    text = field_at(obj, settings.text_field)
    if text is _MISSING:
        raise DecodeError("missing_text", f"{what} has no field {settings.text_field!r}")
    if not isinstance(text, str):
        raise DecodeError(
            "text_not_string",
            f"field {settings.text_field!r} is a {type(text).__name__}, expected a string",
        )
    if not text.strip():
        raise DecodeError("blank_text", f"field {settings.text_field!r} is blank")
    msg_id = id_text(field_at(obj, settings.id_field)) or _fallback_id(record)
    keep = settings.keep_fields
    if keep is None:
        fields = _scalar_fields(obj, settings.text_field)
    elif keep:
        fields = {k: v for k in keep if k != settings.text_field and k in obj
                  and isinstance(v := obj[k], (str, int, float, bool))}
    else:
        fields = {}
    return DecodedText(record=record, id=msg_id, text=text, fields=fields)

