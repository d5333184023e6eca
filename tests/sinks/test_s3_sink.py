"""The Parquet sink and the start-up check on a real S3 API server (moto, server mode, IAM checks on)."""

from __future__ import annotations

import socket

import pyarrow.dataset as ds
import pytest

from nlpstream.sinks import OutputRow, ParquetSink, SinkConfigError, SinkWriteError, check_output
from nlpstream.sinks.storage import fs_options, scrub, secret_values
from tests.s3 import REGION, hidden_objects, objects

DAY1 = 1_795_000_000_000  # 2026-11-18 UTC
DAY2 = DAY1 + 86_400_000


def row(topic: str, partition: int, offset: int, ts: int = DAY1) -> OutputRow:
    return OutputRow(topic, partition, offset, f"id-{partition}-{offset}", f"text {offset}", "neutral", 0.9, ts, ts + 5,
                     "m")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_writes_final_objects_directly_and_reads_back(s3_server, s3_bucket, monkeypatch):
    sink = ParquetSink(f"s3://{s3_bucket}/out", storage_options=s3_server.storage_options(), skip_written=True)
    written_paths: list[str] = []
    pipe = sink.fs.pipe_file  # fsspec shares the instance: monkeypatch puts it back after the test
    monkeypatch.setattr(sink.fs, "pipe_file",
                        lambda path, data, **kw: (written_paths.append(path), pipe(path, data, **kw))[1])
    monkeypatch.setattr(sink.fs, "mv", lambda *a, **kw: pytest.fail("an object store must not rename (copy + delete)"))
    sink.write([row("a", 0, i) for i in range(5)] + [row("a", 1, i, DAY2) for i in range(3)])
    files = sink.flush()
    assert [(f.key.partition, f.key.first_offset, f.key.last_offset) for f in files] == [(0, 0, 4), (1, 0, 2)]
    assert written_paths == [f.path for f in files], "one PUT per file, straight to its final name"
    assert all(not p.rsplit("/", 1)[-1].startswith((".", "_")) for p in written_paths)
    table = ds.dataset(f"{s3_bucket}/out", filesystem=s3_server.filesystem(), partitioning="hive").to_table()
    assert sorted(zip(table.column("partition").to_pylist(), table.column("offset").to_pylist())) == \
        [(0, i) for i in range(5)] + [(1, i) for i in range(3)]
    assert hidden_objects(s3_server, s3_bucket) == []


def test_last_offset_sees_another_writers_objects_through_the_listing_cache(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/out"
    reader = ParquetSink(url, storage_options=s3_server.storage_options())
    reader.write([row("a", 0, i) for i in range(5)])
    reader.flush()
    assert reader.last_offset("a", 0) == 4  # s3fs now holds this listing in its cache
    other = ParquetSink(url, storage_options={**s3_server.storage_options(), "skip_instance_cache": True})
    assert other.fs is not reader.fs
    other.write([row("a", 0, i) for i in range(5, 10)])
    other.flush()
    assert reader.last_offset("a", 0) == 9, "a cached listing would hide the other worker's file"
    # skip_written lists afresh too: the rows another worker holds are not written again
    reader.skip_written = True
    reader.write([row("a", 0, i) for i in range(8, 15)])
    assert [(f.key.first_offset, f.key.last_offset) for f in reader.flush()] == [(10, 14)]
    table = ds.dataset(f"{s3_bucket}/out", filesystem=s3_server.filesystem(), partitioning="hive").to_table()
    assert sorted(table.column("offset").to_pylist()) == list(range(15))


def test_leftover_temp_objects_are_removed_on_assignment(s3_server, s3_bucket):
    sink = ParquetSink(f"s3://{s3_bucket}/out", storage_options=s3_server.storage_options())
    sink.write([row("a", 0, 1)])
    sink.flush()
    leftover = f"{s3_bucket}/out/topic=a/date=2026-11-18/.part-00000-00000000000000000002-00000000000000000009.parquet.tmp"
    other_partition = leftover.replace(".part-00000-", ".part-00001-")
    fs = s3_server.filesystem()
    fs.pipe_file(leftover, b"partial")
    fs.pipe_file(other_partition, b"partial")
    assert sink.last_offset("a", 0) == 1
    assert sink.remove_temp_files("a", 0) == 1
    assert hidden_objects(s3_server, s3_bucket) == [other_partition]


def test_missing_bucket_is_a_recoverable_error_and_no_bucket_is_created(s3_server, unique):
    bucket = f"{unique}-late"
    sink = ParquetSink(f"s3://{bucket}/out", storage_options=s3_server.storage_options(), skip_written=True)
    sink.write([row("a", 0, i) for i in range(3)])
    with pytest.raises(SinkWriteError):
        sink.flush()
    assert sink.buffered == 3, "the rows stay buffered for the retry"
    assert bucket not in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    s3_server.make_bucket(bucket)
    assert [(f.key.first_offset, f.key.last_offset) for f in sink.flush()] == [(0, 2)]
    assert sink.buffered == 0


def test_write_errors_carry_no_secret(s3_server, s3_bucket):
    wrong = "Wr0ngSecretValue/abc+xyz"
    sink = ParquetSink(f"s3://{s3_bucket}/out", storage_options=s3_server.storage_options(secret=wrong))
    sink.write([row("a", 0, 0)])
    with pytest.raises(SinkWriteError) as info:
        sink.flush()
    assert "signature" in str(info.value).lower() and wrong not in str(info.value)
    with pytest.raises(SinkWriteError) as info:
        sink.last_offset("a", 0)
    assert wrong not in str(info.value)
    assert objects(s3_server, s3_bucket) == []


def test_unreachable_endpoint_is_a_recoverable_error(s3_server):
    options = {**s3_server.storage_options(), "endpoint_url": f"http://127.0.0.1:{closed_port()}",
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    sink = ParquetSink("s3://nowhere/out", storage_options=options)
    sink.write([row("a", 0, 0)])
    with pytest.raises(SinkWriteError, match="connect"):  # botocore's own error, translated at the boundary
        sink.flush()
    assert sink.buffered == 1
    with pytest.raises(SinkWriteError):
        sink.last_offset("a", 0)


def test_check_output_probes_the_bucket_and_leaves_nothing(s3_server, s3_bucket):
    check_output(f"s3://{s3_bucket}/prefix", s3_server.storage_options())
    assert objects(s3_server, s3_bucket) == []


@pytest.mark.parametrize("case", ["missing bucket", "wrong secret", "unreachable", "no permission"])
def test_check_output_errors_are_one_line_without_secrets(s3_server, s3_bucket, case):
    secret = "Sup3rSecretKeyThatMustNotLeak/42"
    options = s3_server.storage_options()
    bucket = s3_bucket
    if case == "missing bucket":
        bucket, expected = f"{s3_bucket}-missing", "not found (does the bucket exist?)"
    elif case == "wrong secret":
        options, expected = s3_server.storage_options(secret=secret), "access denied"
    elif case == "unreachable":
        options = {**options, "endpoint_url": f"http://127.0.0.1:{closed_port()}",
                   "config_kwargs": {"retries": {"max_attempts": 1}}}
        expected = "the storage cannot be reached"
    else:
        s3_server.revoke_writer()
        expected = "access denied"
    try:
        with pytest.raises(SinkConfigError) as info:
            check_output(f"s3://{bucket}/prefix", options)
    finally:
        if case == "no permission":
            s3_server.restore_writer()
    message = str(info.value)
    assert message.startswith(f"output s3://{bucket}/prefix cannot be written: {expected}"), message
    assert "\n" not in message and secret not in message and s3_server.secret not in message


def test_aws_region_is_used_when_botocore_has_no_region(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert fs_options("s3://b/p", None) == {"client_kwargs": {"region_name": "eu-west-3"}}
    assert fs_options("s3://b/p", {"client_kwargs": {"region_name": "us-east-2"}}) == {
        "client_kwargs": {"region_name": "us-east-2"}}
    assert fs_options("memory://p", None) == {}
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    assert fs_options("s3://b/p", None) == {}


def test_scrub_removes_option_values_env_secrets_and_url_passwords(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envSecretValue99")
    secrets = secret_values({"key": "AKIAEXAMPLE", "secret": "s3cr/et+value", "client_kwargs": {"x": ["nestedval"]},
                             "anon": False, "n": "ab"})
    text = ("AKIAEXAMPLE s3cr/et+value nestedval envSecretValue99 s3://user:pa/ss@bucket/x ab")
    assert scrub(text, secrets) == "*** *** *** *** s3://***@bucket/x ab"
