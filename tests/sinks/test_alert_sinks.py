import json

import pytest

from nlpstream.sinks import Alert, FileAlertSink, SinkWriteError


def alert(i):
    return Alert(f"id{i}", "r", "message", "t", 0, i, f"m{i}", None, 1)


def test_file_sink_appends_and_never_repeats_an_id(tmp_path):
    path = tmp_path / "alerts.jsonl"
    sink = FileAlertSink(path)
    sink.write([alert(1), alert(2), alert(1)])
    sink.flush()
    again = FileAlertSink(path)  # a restart / replay
    again.write([alert(2), alert(3)])
    again.close()
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert ids == ["id1", "id2", "id3"]


def test_torn_last_line_is_tolerated(tmp_path):
    path = tmp_path / "alerts.jsonl"
    path.write_text(alert(1).to_json() + "\n" + '{"id": "id2", "ru')
    sink = FileAlertSink(path)
    sink.write([alert(1), alert(2)])
    sink.flush()
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["id"] == "id2"
    assert sum('"id1"' in line for line in lines) == 1


def test_file_sink_flushes_only_sealed_alerts_and_keeps_them_on_error(tmp_path):
    path = tmp_path / "alerts.jsonl"
    sink = FileAlertSink(path)
    sink.write([alert(1)])
    sink.seal()
    sink.write([alert(2)])  # written while the sealed alerts are flushed
    sink.flush_sealed()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["id1"]
    sink.seal()
    real = sink.path
    sink.path = tmp_path / "no-such-folder" / "alerts.jsonl"
    with pytest.raises(SinkWriteError):
        sink.flush_sealed()
    sink.path = real
    sink.write([alert(3)])
    sink.flush()  # the failed flush's alert first, then the newer one
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["id1", "id2", "id3"]

