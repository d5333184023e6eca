"""The local broker launcher formats, starts, reports and stops a real broker."""

import uuid

import pytest

from nlpstream.consumers import kafka_local

pytestmark = pytest.mark.kafka


def test_start_status_stop_with_a_cluster_id_starting_with_a_dash(tmp_path, monkeypatch):
    # base64url cluster ids can start with "-": the format step must not read it as an option
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(bytes=b"\xfb" + b"\x00" * 15))
    info = kafka_local.start(tmp_path / "b", port=0, timeout_s=120)
    try:
        recorded, running = kafka_local.status(tmp_path / "b")
        assert running and recorded.bootstrap_servers == info.bootstrap_servers
        assert kafka_local.start(tmp_path / "b").pid == info.pid  # already running: returned as is
    finally:
        assert kafka_local.stop(tmp_path / "b")
    assert kafka_local.status(tmp_path / "b")[1] is False
    assert not kafka_local.stop(tmp_path / "b")
