"""Delta Lake and Iceberg output: exactly-once through kill -9, a group member killed and added, a table refusing
commits and a broker restart, the Kafka progress read back from the table itself (real broker, tables read with
Polars and pyiceberg). The fault runs are transactional (kafka.transactions) over topics where every 8th record
cannot be decoded, and every negative message alerts to a Kafka topic: a read_committed reader sees each dead
letter and alert once."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import yaml

from tests.jobs.faults import (check_txn_topics, committed, dirty_corpus, dirty_topic, end_offsets, good_ids,
                               own_broker_with_topic, reap, stream_proc, txn_env, wait_for)

pytestmark = [pytest.mark.kafka, pytest.mark.model]
FORMATS = ("delta", "iceberg")


@pytest.fixture(autouse=True)
def _reap_jobs():
    yield
    reap()


class Table:
    """Where one format's table lives and how a reader sees it."""

    def __init__(self, fmt: str, root: Path) -> None:
        self.fmt = fmt
        self.location = root / "table"
        self.catalog = {"type": "sql", "uri": f"sqlite:///{root / 'catalog.db'}", "warehouse": f"file://{root / 'wh'}"}
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "job.yaml"
        output = {"format": fmt}
        if fmt == "iceberg":
            output["iceberg"] = {"catalog": self.catalog, "table": "nlp.labeled"}
        self.config.write_text(yaml.safe_dump({"output": output}))

    def args(self) -> list[str]:
        return ["--config", str(self.config)]

    @property
    def out(self) -> Path:
        return self.location

    def read(self):
        """The whole table as Arrow (Polars for Delta, pyiceberg for Iceberg); None before the first commit."""
        if self.fmt == "delta":
            import polars as pl

            if not (self.location / "_delta_log").exists():
                return None
            return pl.read_delta(str(self.location)).to_arrow()
        from pyiceberg.catalog import load_catalog
        from pyiceberg.exceptions import NoSuchTableError

        try:
            return load_catalog("default", **self.catalog).load_table("nlp.labeled").scan().to_arrow()
        except NoSuchTableError:
            return None

    def rows(self) -> int:
        table = self.read()
        return 0 if table is None else table.num_rows

    def progress(self, topic: str, partitions: int) -> list[int | None]:
        """The last offset per partition as the table's own commits record it."""
        if self.fmt == "delta":
            from deltalake import DeltaTable

            table = DeltaTable(str(self.location))
            return [table.transaction_version(f"nlpstream:{topic}:{p}") for p in range(partitions)]
        from pyiceberg.catalog import load_catalog

        summary = load_catalog("default", **self.catalog).load_table("nlp.labeled").current_snapshot().summary
        values = summary.additional_properties
        return [int(values[f"nlpstream.offset.{topic}.{p}"]) if f"nlpstream.offset.{topic}.{p}" in values else None
                for p in range(partitions)]


def check_exactly_once(table: Table, topic: str, parts: int, n: int, bootstrap: str | None = None,
                       group: str | None = None, what: str = "") -> None:
    """Each decodable message of ``dirty_corpus(n, ...)`` once in the table, its progress at the rows' ends; with
    ``bootstrap``: the group committed the whole topic, and each dead letter and alert is read once."""
    data = table.read()
    pairs = list(zip(data.column("partition").to_pylist(), data.column("offset").to_pylist()))
    ids = data.column("id").to_pylist()
    prefix = ids[0].rsplit("-", 1)[0]
    assert len(pairs) == len(set(pairs)) and sorted(ids) == sorted(good_ids(n, prefix)), \
        f"{len(pairs)} rows, {len(set(pairs))} distinct, {len(good_ids(n, prefix))} expected"
    assert set(data.column("topic").to_pylist()) == {topic} and None not in data.column("label").to_pylist()
    ends = [max(o for p, o in pairs if p == q) for q in range(parts)]
    assert table.progress(topic, parts) == ends
    if bootstrap is not None:
        assert committed(bootstrap, group, topic, parts) == end_offsets(bootstrap, topic, parts)
        negative = {i for i, label in zip(ids, data.column("label").to_pylist()) if label == "negative"}
        check_txn_topics(bootstrap, topic, n - len(ids), f"{table.fmt}: {what}", alert_ids=negative)


def spawn(bootstrap, topic, table, group, log, *extra, transactions=True):
    return stream_proc(bootstrap, topic, table.out, group, *table.args(), *extra, log=log,
                       env=txn_env(topic) if transactions else None)



@pytest.mark.parametrize("fmt", FORMATS)
def test_kill_9_then_resume_from_the_table(fmt, kafka_bootstrap, make_topic, unique, tmp_path):
    # enough records that at least two kills land mid-stream with the CPU engine at ~900 texts/s (3,000 were
    # labeled before the second kill in one CI run)
    parts, n = 3, 6000
    topic, _ = dirty_topic(kafka_bootstrap, make_topic, unique, parts, n)
    table, log = Table(fmt, tmp_path), tmp_path / "job.log"
    rng = random.Random(int(os.environ.get("NLPSTREAM_FAULT_SEED", "20261129")))
    kills, before = 0, []
    for _ in range(6):
        proc = spawn(kafka_bootstrap, topic, table, f"{unique}-g", log)
        start = table.rows()
        wait_for(lambda: table.rows() > start or proc.poll() is not None, 180, "a new commit", proc)
        time.sleep(rng.uniform(0.0, 1.5))
        done = table.rows()
        assert proc.poll() is None, log.read_text()[-2000:]
        proc.kill()
        proc.wait(timeout=30)
        if done >= len(good_ids(n, unique)):
            break
        kills += 1
        before.append(done)
        if kills == 3:
            break
    assert kills >= 2, f"only {kills} kills landed mid-stream (rows before each: {before})"
    final = spawn(kafka_bootstrap, topic, table, f"{unique}-g", log, "--idle-timeout", "6")
    assert final.wait(timeout=600) == 0, log.read_text()[-3000:]
    print(f"\nFAULT-TABLE | kill -9 ({fmt}) | {kills} | {n} | rows before each kill {before}")
    check_exactly_once(table, topic, parts, n, kafka_bootstrap, f"{unique}-g", f"kill -9 x{kills}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_group_member_killed_and_another_added(fmt, kafka_bootstrap, make_topic, unique, tmp_path):
    parts, n = 4, 3000
    topic, _ = dirty_topic(kafka_bootstrap, make_topic, unique, parts, n)
    table, log, group = Table(fmt, tmp_path), tmp_path / "job.log", f"{unique}-g"
    a = spawn(kafka_bootstrap, topic, table, group, log)
    b = spawn(kafka_bootstrap, topic, table, group, log, "--idle-timeout", "10")
    wait_for(lambda: table.rows() > 300, 180, "both members writing", b)
    a.kill()
    a.wait(timeout=30)
    wait_for(lambda: table.rows() > 900, 180, "progress after the kill", b)
    c = spawn(kafka_bootstrap, topic, table, group, log, "--idle-timeout", "10")
    assert b.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert c.wait(timeout=600) == 0, log.read_text()[-3000:]
    check_exactly_once(table, topic, parts, n, kafka_bootstrap, group, "member killed, another added")


def test_zombie_racing_the_new_owner_commits_nothing_twice(tmp_path):
    """Two sinks over one table, both holding offsets 0..99 of a partition (an evicted worker and the new
    owner): whichever commits second finds the rows there and writes nothing again, in both formats."""
    from nlpstream.sinks import DeltaSink, IcebergSink, OutputRow

    rows = [OutputRow("t", 0, o, f"m{o}", "x", "neutral", 0.5, 1764400000000, 1764400000000, "m") for o in range(100)]
    for fmt in FORMATS:
        table = Table(fmt, tmp_path / fmt)
        make = (lambda: DeltaSink(str(table.location))) if fmt == "delta" else \
            (lambda: IcebergSink(table.catalog, "nlp.labeled"))
        zombie, owner = make(), make()
        for sink in (zombie, owner):
            sink.check()
            sink.write(rows[:60] if sink is zombie else rows)
        assert [(f.key.first_offset, f.key.last_offset) for f in owner.flush()] == [(0, 99)]
        assert zombie.flush() == []  # its 0..59 are in the table already
        assert owner.last_offset("t", 0) == 99 and table.rows() == 100


def test_workers_starting_together_both_open_the_iceberg_table(tmp_path):
    """Two workers that start together both find the namespace and table missing and create them; the SQL
    catalog refuses the loser with a unique-constraint error (not "already exists"): it uses what the other
    created. Replayed here by letting the loser's creates run after the winner's."""
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    from nlpstream.sinks import IcebergSink, SinkError

    table = Table("iceberg", tmp_path)
    winner, loser = IcebergSink(table.catalog, "nlp.labeled"), IcebergSink(table.catalog, "nlp.labeled")
    catalog = loser._catalog_()
    real_load, looks = catalog.load_table, []

    def load_table(identifier):  # the loser's first look finds no table: the winner had not created it yet
        looks.append(identifier)
        if len(looks) == 1:
            winner.check()
            raise NoSuchTableError(identifier)
        return real_load(identifier)

    def refused(*args, **kwargs):
        raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed")

    def missing(error):
        def probe(*args, **kwargs):
            raise error("gone")
        return probe

    catalog.load_table, catalog.create_namespace, catalog.create_table = load_table, refused, refused
    loser.check()  # no error: the namespace and table the winner made are used
    catalog.load_table = real_load
    assert loser.last_offset("t", 0) is None
    catalog.load_namespace_properties = missing(NoSuchNamespaceError)
    catalog.load_table = missing(NoSuchTableError)
    with pytest.raises(SinkError, match="UNIQUE constraint"):  # refused and really missing: the catalog's error
        loser.check()


def test_table_mismatch_and_bad_catalog_are_one_error_line(tmp_path):
    import subprocess
    import sys

    from nlpstream.sinks import DeltaSink, OutputRow, SinkError

    location = tmp_path / "t"
    sink = DeltaSink(str(location), include_text=False)
    sink.write([OutputRow("t", 0, 0, "m0", "x", "neutral", 0.5, 1764400000000, 1764400000000, "m")])
    sink.flush()
    with pytest.raises(SinkError, match="does not match this job's output"):
        DeltaSink(str(location), include_text=True).check()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"output": {"format": "iceberg", "iceberg": {
        "catalog": {"type": "rest", "uri": "http://127.0.0.1:9"}, "table": "nlp.x"}}}))
    proc = subprocess.run([sys.executable, "-m", "nlpstream.jobs.cli", "stream", "--topic", "x", "--config", str(bad),
                           "--bootstrap-servers", "127.0.0.1:9"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "iceberg table nlp.x" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _chattr(flag: str, *paths: Path) -> None:
    import subprocess

    proc = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True)
    assert proc.returncode == 0, f"chattr {flag} failed (needs root on ext4/xfs): {proc.stderr}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_table_refusing_commits_then_back(fmt, kafka_bootstrap, make_topic, unique, tmp_path):
    """The Delta log folder or the Iceberg catalog read-only mid-stream: retries, nothing committed to Kafka
    meanwhile, one WARNING; then every record exactly once."""
    parts, n = 3, 2500
    topic, _ = dirty_topic(kafka_bootstrap, make_topic, unique, parts, n)
    table, log, group = Table(fmt, tmp_path), tmp_path / "job.log", f"{unique}-g"
    job = spawn(kafka_bootstrap, topic, table, group, log, "--max-messages", str(n))
    wait_for(lambda: table.rows() > 300, 180, "first commits", job)
    frozen = [table.location / "_delta_log"] if fmt == "delta" else [tmp_path / "catalog.db", tmp_path]
    _chattr("+i", *frozen)
    try:
        time.sleep(1.5)
        at_start, rows_at_start = committed(kafka_bootstrap, group, topic, parts), table.rows()
        time.sleep(6)
        assert committed(kafka_bootstrap, group, topic, parts) == at_start, "offsets committed during the outage"
        assert table.rows() == rows_at_start and job.poll() is None
    finally:
        _chattr("-i", *frozen)
    assert job.wait(timeout=600) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("flush failed, retrying with backoff") == 1 and "flush succeeded again after" in text
    print(f"\nFAULT-TABLE | {fmt} table refusing commits 7.5 s | 1 | {n} | rows when it began {rows_at_start}")
    check_exactly_once(table, topic, parts, n, kafka_bootstrap, group, "table refusing commits")


@pytest.mark.parametrize("fmt", FORMATS)
def test_broker_stopped_20s_mid_stream(fmt, unique, tmp_path):
    from nlpstream.consumers import kafka_local

    data, n = tmp_path / "broker", 2500
    info = own_broker_with_topic(data, unique, 3, dirty_corpus(n, unique)[0])
    try:
        table, log = Table(fmt, tmp_path), tmp_path / "job.log"
        # a transaction that fails with the broker is handled again: stop when idle, not after n records
        job = spawn(info.bootstrap_servers, unique, table, f"{unique}-g", log, "--idle-timeout", "10")
        wait_for(lambda: table.rows() > 300, 180, "first commits", job)
        kafka_local.stop(data)
        stopped_at = table.rows()
        time.sleep(20)
        assert job.poll() is None, "the job must wait for the broker, not exit"
        kafka_local.start(data, timeout_s=120)
        assert job.wait(timeout=600) == 0, log.read_text()[-3000:]
        print(f"\nFAULT-TABLE | broker stopped 20 s ({fmt}) | 1 | {n} | rows when stopped {stopped_at}")
        assert stopped_at < n
        check_exactly_once(table, unique, 3, n, info.bootstrap_servers, f"{unique}-g", "broker stopped 20 s")
    finally:
        kafka_local.stop(data)
