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


# -- msgspec's path gives the standard library's answer for every value ------------------------------------------
def _outcome(fn, record, settings):
    try:
        d = fn(record, settings)
        return ("ok", d.id, d.text, repr(sorted(d.fields.items())))
    except DecodeError as exc:
        return ("error", exc.kind, str(exc))


def _nested(depth: int) -> bytes:
    return b'{"text": "a", "x": ' + b"[" * depth + b"]" * depth + b"}"


TRICKY = [
    None, b"", b" ", b"\xff\xfe abc", b"\xef\xbb\xbf" + b'{"text": "bom"}', b'{"text": "a\xed\xa0\x80"}',
    b"{not json", b'{"text": "a",}', b"{'text': 'a'}", b'{"text": "a"} x', b'{"text": "a"}\x00', b"[1, 2]", b'"s"',
    b"null", b"17", b'{"id": 1}', b'{"text": 42}', b'{"text": null}', b'{"text": true}', b'{"text": "  \\n "}',
    b'{"text": "\\ud800 lone"}', b'{"text": "a\\u0000b", "id": "x"}', b'{"text": "a\x01"}', b'{"text": "t\tab"}',
    b'{"text": "dup", "text": "last"}', b'{"text": "n", "n": NaN, "i": Infinity}', b'{"text": "n", "n": 1E400}',
    b'{"text": "n", "n": 1.7976931348623157e309, "m": -0.0, "f": 0.1000000000000000055511151231257827}',
    b'{"text": "big", "id": 123456789012345678901234567890, "n": -9223372036854775809}',
    b'{"text": "big", "id": 18446744073709551616}', b'{"text": "f", "id": 1.5}', b'{"text": "b", "id": true}',
    b'{"text": "e", "id": ""}', b'{"text": "n", "n": 01}', b'{"text": "n", "n": 1.}', b'{"text": "n", "n": .5}',
    b'\t{"text": "ws"}\r\n', b'{"text": "ff"}\x0c', b'{"body": {"text": "nested"}, "text": 3}',
    b'{"body.text": "dotted key", "body": {"text": "nested"}}', b'{"text": "\xc3\xa9t\xc3\xa9 \xf0\x9f\x98\x80"}',
    # not 950-999: there the stdlib's own edge moves with the caller's stack depth (RecursionError)
    *(_nested(d) for d in (*range(0, 950, 50), 1000, 1200, 5000)),
]


@pytest.mark.parametrize("settings", [JSON, DecodeSettings("json", "body.text", "meta.id"),
                                      DecodeSettings("json", "body.text", "body")])
def test_msgspec_path_matches_the_standard_library(settings):
    from nlpstream.consumers.decode import _decode_stdlib

    for i, value in enumerate(TRICKY):
        for key in (None, b"k-1"):
            record = InputRecord("orders", 2, i, key, value, 1_700_000_000_000)
            assert _outcome(decode_record, record, settings) == _outcome(_decode_stdlib, record, settings), value


def test_msgspec_path_matches_on_random_objects():
    import random

    from nlpstream.consumers.decode import _decode_stdlib

    rng = random.Random(7)
    scalars = [lambda: rng.randint(-2**70, 2**70), lambda: rng.random() * 10 ** rng.randint(-300, 300),
               lambda: rng.choice([True, False, None]), lambda: "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(5)),
               lambda: rng.choice(["", " ", "text", "\u00e9\u00e9", "\\"])]
    for i in range(2000):
        obj = {rng.choice(["id", "text", "a", "b", "body"]): rng.choice(scalars)() for _ in range(rng.randint(0, 5))}
        if rng.random() < 0.3:
            obj["body"] = {"text": rng.choice(scalars)()}
        value = json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode()
        record = InputRecord("orders", 2, i, None, value, 1_700_000_000_000)
        for settings in (JSON, DecodeSettings("json", "body.text", "a")):
            assert _outcome(decode_record, record, settings) == _outcome(_decode_stdlib, record, settings), value


def test_keep_fields_keeps_only_the_named_scalar_fields():
    value = b'{"id": "a", "text": "hello", "customer": "acme", "ticker": 7, "nested": {"x": 1}, "flag": true}'
    every = decode_record(rec(value), DecodeSettings())
    assert every.fields == {"id": "a", "customer": "acme", "ticker": 7, "flag": True}
    keys = decode_record(rec(value), DecodeSettings(keep_fields=("ticker", "nested", "missing", "text")))
    assert keys.fields == {"ticker": 7}, "named, present, scalar and not the text field"
    assert decode_record(rec(value), DecodeSettings(keep_fields=())).fields == {}
    assert (keys.id, keys.text) == (every.id, every.text)


def test_an_integer_longer_than_python_converts_is_no_id_and_refuses_no_record():
    """Python refuses to turn integers of over 4,300 digits into ``int`` (a ValueError, which escaped the
    decode before): such an id takes the fallback id, and such a number elsewhere reads as a float."""
    digits = b"9" * 5000
    got = decode_record(rec(b'{"id": ' + digits + b', "text": "hi"}', key=b"k1"), JSON)
    assert (got.id, got.text) == ("k1", "hi")
    got = decode_record(rec(b'{"id": "a", "n": -' + digits + b', "text": "hi"}'), JSON)
    assert got.id == "a" and got.fields["n"] == float("-inf")
