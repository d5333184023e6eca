import json

import pytest

from nlpstream.consumers import DecodeError, DecodeSettings, InputRecord, decode_record


def rec(value, key=None, offset=5):
    return InputRecord("orders", 2, offset, key, value, 1_700_000_000_000)


JSON = DecodeSettings("json", "text", "id")
TEXT = DecodeSettings("text")


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (None, "empty_value"),
        (b"", "empty_value"),
        (b"\xff\xfe abc", "invalid_utf8"),
        (b"{not json", "malformed_json"),
        (b"[1, 2]", "not_an_object"),
        (b'"just a string"', "not_an_object"),
        (b'{"id": 1}', "missing_text"),
        (b'{"text": 42}', "text_not_string"),
        (b'{"text": null}', "text_not_string"),
        (b'{"text": "  \\n "}', "blank_text"),
    ],
)
def test_bad_json_values_name_their_kind(value, kind):
    with pytest.raises(DecodeError) as info:
        decode_record(rec(value), JSON)
    assert info.value.kind == kind
    assert str(info.value)


def test_id_fallbacks():
    assert decode_record(rec(b'{"id": "abc", "text": "hi"}', key=b"k"), JSON).id == "abc"
    assert decode_record(rec(b'{"id": 17, "text": "hi"}'), JSON).id == "17"
    assert decode_record(rec(b'{"text": "hi"}', key=b"key-1"), JSON).id == "key-1"
    assert decode_record(rec(b'{"text": "hi"}'), JSON).id == "orders-2-5"
    assert decode_record(rec(b"plain", key=None), TEXT).id == "orders-2-5"


def test_custom_fields_and_extra_fields_kept():
    settings = DecodeSettings("json", "body", "ticket")
    d = decode_record(rec(json.dumps({"ticket": "T-9", "body": "help", "customer": "acme", "n": {"x": 1}}).encode()), settings)
    assert (d.id, d.text) == ("T-9", "help")
    assert d.fields == {"ticket": "T-9", "customer": "acme"}


@pytest.mark.parametrize("text", ["😀 emoji only 🎉", "مرحبا بالعالم", "nul\x00inside", "x" * 1_000_000])
def test_unusual_valid_text_is_accepted(text):
    assert decode_record(rec(json.dumps({"text": text}).encode()), JSON).text == text
    assert decode_record(rec(text.encode()), TEXT).text == text


def test_plain_text_blank_is_refused():
    with pytest.raises(DecodeError) as info:
        decode_record(rec(b"   "), TEXT)
    assert info.value.kind == "blank_text"
