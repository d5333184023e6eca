from nlpstream.sinks.naming import FileKey, parse_name


def test_round_trip_and_sorting():
    key = FileKey("orders", "2026-11-28", 7, 120, 4567)
    assert key.path == "topic=orders/date=2026-11-28/part-00007-00000000000000000120-00000000000000004567.parquet"
    assert parse_name("orders", "2026-11-28", key.name) == key
    later = FileKey("orders", "2026-11-28", 7, 4568, 9999)
    assert sorted([later.name, key.name]) == [key.name, later.name]


def test_temp_and_foreign_names_are_not_parsed():
    key = FileKey("t", "2026-01-01", 0, 1, 2)
    assert key.temp_name.startswith(".")
    assert parse_name("t", "2026-01-01", key.temp_name) is None
    assert parse_name("t", "2026-01-01", "part-0-1-2.parquet") is None
    assert parse_name("t", "2026-01-01", "_SUCCESS") is None
