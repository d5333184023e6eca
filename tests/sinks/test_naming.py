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


def test_hive_date_key_is_the_utc_day_of_the_event_time():
    from datetime import datetime, timezone

    from nlpstream.sinks.schema import OutputRow

    def row(ms):
        return OutputRow("t", 0, 0, "i", "x", "neutral", 1.0, ms, ms, "m")

    for ms in (0, 1, 86_399_999, 86_400_000, 1_790_000_000_123, 1_704_067_199_999, 1_704_067_200_000, -1):
        expected = datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d")
        assert row(ms).date == expected, ms
