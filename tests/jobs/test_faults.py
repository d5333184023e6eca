"""Exactly-once output under crashes, rebalances, broker restarts and sink failures.

Every test runs the real CLI (or the real job) against a real broker and
reads the real Parquet files back. Each prints a line of the fault table:
fault, times, messages, lost, duplicated.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import json_messages, produce, read_output, read_topic
from tests.jobs.faults import (committed, exactness, files, own_broker_with_topic, reap, restarts_of, rows_in,
                               stream_proc, wait_for)

pytestmark = [pytest.mark.kafka, pytest.mark.model]


@pytest.fixture(autouse=True)
def _reap_jobs():
    yield
    reap()


def report(fault: str, times: int, messages: int, result: dict[str, int], extra: str = "") -> None:
    print(f"\nFAULT-TABLE | {fault} | {times} | {messages} | lost {result['lost']} | duplicated {result['duplicated']} {extra}")


def queued_topic(bootstrap: str, make_topic, unique: str, partitions: int, n: int) -> str:
    """A fresh topic holding ``n`` JSON messages spread over ``partitions``."""
    topic = make_topic(unique, partitions=partitions)
    produce(bootstrap, topic, json_messages(n, prefix=unique))
    return topic


CONFLUENT = {"NLPSTREAM_KAFKA__CLIENT": "confluent"}


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_kill_9_at_random_moments(kafka_bootstrap, make_topic, unique, tmp_path, client):
    parts, n = 4, 8000
    env = CONFLUENT if client == "confluent" else None
    topic = queued_topic(kafka_bootstrap, make_topic, unique, parts, n)
    out, log = tmp_path / "out", tmp_path / "job.log"
    rng = random.Random(int(os.environ.get("NLPSTREAM_FAULT_SEED", "20261128")))
    kills = 0
    seen_before_kill = []
    stall_restarts = 0
    for attempt in range(10):
        proc = stream_proc(kafka_bootstrap, topic, out, f"{unique}-g", log=log, env=env)
        if attempt % 2 == 1:  # every other kill lands right after a file appeared (mid-write window)
            before = len(files(out))
            wait_for(lambda: len(files(out)) > before or rows_in(out) >= n or proc.poll() is not None, 120, "a new file")
            time.sleep(rng.uniform(0.0, 0.4))
        else:
            time.sleep(rng.uniform(3.0, 7.0))  # some land while the model loads, some mid-batch
        done = rows_in(out)
        assert proc.poll() is None, f"the job exited by itself ({proc.returncode}): {log.read_text()[-2000:]}"
        proc.kill()
        proc.wait(timeout=30)
        stall_restarts += restarts_of(proc)
        if done >= n:
            break  # it had finished before the kill: not a mid-stream kill
        kills += 1
        seen_before_kill.append(done)
        if kills == 6:
            break
    assert kills >= 5, f"only {kills} kills landed mid-stream (rows before each: {seen_before_kill})"
    final = stream_proc(kafka_bootstrap, topic, out, f"{unique}-g", "--idle-timeout", "6", log=log, env=env)
    code = final.wait(timeout=600)
    stall_restarts += restarts_of(final)
    assert code == 0, log.read_text()[-3000:]
    result = exactness(out, parts, n)
    if client == "confluent":  # a rebuild loop (a position it cannot see past) would still end exact
        assert "rebuilding the consumer" not in log.read_text()
    report(f"kill -9 at random moments ({client})", kills, n, result,
           f"(rows before each kill: {seen_before_kill}; supervisor restarts after a stall: {stall_restarts})")
    assert result == {"rows": n, "lost": 0, "duplicated": 0, "gaps": 0, "partitions_seen": parts}
    assert not list(out.glob("topic=*/date=*/.*")), "temporary files left visible"
    assert committed(kafka_bootstrap, f"{unique}-g", topic, parts) == [
        max(o for p, o in zip(read_output(out).column("partition").to_pylist(), read_output(out).column("offset").to_pylist()) if p == q) + 1
        for q in range(parts)]


@pytest.mark.parametrize("clients", ["kafka-python", "mixed"])
def test_group_member_killed_and_another_added(kafka_bootstrap, make_topic, unique, tmp_path, clients):
    """mixed: the killed member and the one added use confluent-kafka, the other kafka-python (one group)."""
    parts, n = 6, 5000
    topic = queued_topic(kafka_bootstrap, make_topic, unique, parts, n)
    out, log = tmp_path / "out", tmp_path / "job.log"
    group = f"{unique}-g"
    env = CONFLUENT if clients == "mixed" else None
    own_log = tmp_path / "confluent.log" if clients == "mixed" else log  # the confluent members' own log
    a = stream_proc(kafka_bootstrap, topic, out, group, log=own_log, env=env)
    b = stream_proc(kafka_bootstrap, topic, out, group, "--idle-timeout", "10", log=log)
    wait_for(lambda: rows_in(out) > 600, 180, "both members writing", b)
    a.kill()
    a.wait(timeout=30)
    wait_for(lambda: rows_in(out) > 1500, 180, "progress after the kill", b)
    c = stream_proc(kafka_bootstrap, topic, out, group, "--idle-timeout", "10", log=own_log, env=env)
    assert b.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert c.wait(timeout=600) == 0, own_log.read_text()[-3000:]
    result = exactness(out, parts, n)
    if clients == "mixed":  # the kafka-python member may rebuild after a client-side fetch stall; these may not
        assert "rebuilding the consumer" not in own_log.read_text()
    report(f"consumer group ({clients} clients): one member killed, one added", 2, n, result,
           f"(supervisor restarts after a stall: {restarts_of(a, b, c)})")
    assert result == {"rows": n, "lost": 0, "duplicated": 0, "gaps": 0, "partitions_seen": parts}


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_broker_stopped_20s_mid_stream(make_topic, unique, tmp_path, client):
    from nlpstream.consumers import kafka_local

    data, n = tmp_path / "broker", 4000
    info = own_broker_with_topic(data, unique, 3, json_messages(n, prefix=unique))
    try:
        out, log = tmp_path / "out", tmp_path / "job.log"
        # stop when idle, not after n records: a client that loses its assignment while the broker is away
        # (librdkafka's session times out on its own) drops what was not durable, and it is consumed again
        job = stream_proc(info.bootstrap_servers, unique, out, f"{unique}-g", "--idle-timeout", "10", log=log,
                          env=CONFLUENT if client == "confluent" else None)
        wait_for(lambda: rows_in(out) > 300, 180, "first rows", job)
        kafka_local.stop(data)
        stopped_at = rows_in(out)
        time.sleep(20)
        assert job.poll() is None, "the job must wait for the broker, not exit"
        info = kafka_local.start(data, timeout_s=120)
        assert job.wait(timeout=600) == 0, log.read_text()[-3000:]
        result = exactness(out, 3, n)
        report(f"broker stopped 20 s mid-stream ({client})", 1, n, result,
               f"(rows when stopped: {stopped_at}; supervisor restarts after a stall: {restarts_of(job)})")
        assert stopped_at < n
        assert result == {"rows": n, "lost": 0, "duplicated": 0, "gaps": 0, "partitions_seen": 3}
    finally:
        kafka_local.stop(data)


def _chattr(flag: str, *paths: Path) -> None:
    proc = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True)
    assert proc.returncode == 0, f"chattr {flag} failed (needs root on ext4/xfs): {proc.stderr}"


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_output_read_only_mid_stream_then_writable(kafka_bootstrap, make_topic, unique, tmp_path, client):
    parts, n = 3, 4000
    topic = queued_topic(kafka_bootstrap, make_topic, unique, parts, n)
    out, log = tmp_path / "out", tmp_path / "job.log"
    group = f"{unique}-g"
    job = stream_proc(kafka_bootstrap, topic, out, group, "--max-messages", str(n), log=log,
                      env=CONFLUENT if client == "confluent" else None)
    wait_for(lambda: rows_in(out) > 300, 180, "first rows", job)
    folders = sorted({p.parent for p in files(out)} | {out / f"topic={topic}", out})
    _chattr("+i", *folders)
    try:
        time.sleep(1.5)  # let a commit in flight land
        at_start = committed(kafka_bootstrap, group, topic, parts)
        rows_at_start = rows_in(out)
        time.sleep(6)
        at_end = committed(kafka_bootstrap, group, topic, parts)
        assert at_end == at_start, "offsets were committed while the output was read-only"
        assert rows_in(out) == rows_at_start
        assert job.poll() is None, "the job must retry, not exit"
    finally:
        _chattr("-i", *folders)
    assert job.wait(timeout=600) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("flush failed, retrying with backoff") == 1, "one WARNING per outage, not one per retry"
    assert "flush succeeded again after" in text
    result = exactness(out, parts, n)
    report(f"output folder read-only for 7.5 s ({client})", 1, n, result, f"(rows when it became read-only: {rows_at_start}; "
           f"supervisor restarts after a stall: {restarts_of(job)})")
    assert result == {"rows": n, "lost": 0, "duplicated": 0, "gaps": 0, "partitions_seen": parts}


class PoisonAwareEngine:
    """The real engine, except that texts with a marker make it raise, as a broken model would."""

    MARK = "☠POISON☠"

    def __init__(self, engine):
        self.inner = engine
        self.model_name = engine.model_name

    def tokenize(self, texts):
        return self.inner.tokenize(texts)

    def classify(self, texts):
        if any(self.MARK in t for t in texts):
            raise RuntimeError("the model raised on this input")
        return self.inner.classify(texts)

    def close(self):
        pass


def test_poison_corpus_only_poison_in_dlq(kafka_bootstrap, make_topic, unique, tmp_path, engine):
    from nlpstream.jobs.config import AlertConfig, InputConfig, KafkaConfig, MetricsConfig, ModelConfig, OutputConfig, StreamConfig
    from nlpstream.jobs.stream import StreamJob

    topic = make_topic(unique, partitions=2)
    bad_values = [b"\xff\xfe", b"", None, b"{nope", b"[1]", b'{"x": 1}', b'{"text": 3}', b'{"text": " "}']
    nasty = {"big": "a long complaint about the delivery. " * 24000, "emoji": "😡😡😡 🔥", "rtl": "الخدمة سيئة جدا",
             "nul": "broken\u0000text"}
    messages, expect_dead, expect_rows = [], 0, set()
    for i in range(200):
        kind = i % 10
        if kind == 0:
            messages.append((f"bad-{i}".encode(), bad_values[(i // 10) % len(bad_values)]))
            expect_dead += 1
        elif kind == 5:
            messages.append((None, json.dumps({"id": f"p{i}", "text": f"{PoisonAwareEngine.MARK} {i}"}).encode()))
            expect_dead += 1
        elif kind == 7:
            name = list(nasty)[(i // 10) % len(nasty)]
            messages.append((None, json.dumps({"id": f"n{i}", "text": nasty[name]}).encode()))
            expect_rows.add(f"n{i}")
        else:
            messages.append((None, json.dumps({"id": f"v{i}", "text": f"Where is my order {i}?"}).encode()))
            expect_rows.add(f"v{i}")
    produce(kafka_bootstrap, topic, messages)
    cfg = StreamConfig.model_construct(
        kafka=KafkaConfig(bootstrap_servers=kafka_bootstrap, topics=[topic], group_id=f"{unique}-g", dlq_topic=f"{topic}.dlq"),
        input=InputConfig(), model=ModelConfig(devices="cpu"), output=OutputConfig(output=str(tmp_path), flush_interval=0.5),
        alerts=AlertConfig(message_min_score=None), metrics=MetricsConfig(metrics_port=None),
        max_messages=len(messages), idle_timeout=60.0)
    summary = StreamJob(cfg, engine=PoisonAwareEngine(engine)).run()
    assert summary.consumed == len(messages)
    assert summary.dead_lettered == expect_dead
    assert set(read_output(tmp_path).column("id").to_pylist()) == expect_rows
    dead = read_topic(kafka_bootstrap, f"{topic}.dlq", expected=expect_dead)
    assert len(dead) == expect_dead
    classes = {dict(r.headers)["nlpstream.error.class"] for r in dead}
    assert b"RuntimeError" in classes
    poison = [r for r in dead if r.value and b"POISON" in r.value]
    assert len(poison) == 20
    assert all(dict(r.headers)["nlpstream.error.class"] == b"RuntimeError" for r in poison)
    report("poison corpus interleaved with nasty valid text", 1, len(messages),
           {"lost": 0, "duplicated": 0}, f"(dead-lettered {expect_dead}, labeled {len(expect_rows)})")


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_burst_keeps_memory_bounded(kafka_bootstrap, make_topic, unique, tmp_path, client):
    parts, n = 3, 12000
    topic = queued_topic(kafka_bootstrap, make_topic, unique, parts, n)
    out, log = tmp_path / "out", tmp_path / "job.log"
    job = stream_proc(kafka_bootstrap, topic, out, f"{unique}-g", "--max-messages", str(n), log=log,
                      env={"NLPSTREAM_OUTPUT__MAX_BUFFERED_ROWS": "2000", **(CONFLUENT if client == "confluent" else {})})
    samples: list[tuple[int, int]] = []
    while job.poll() is None:
        try:
            status = Path(f"/proc/{job.pid}/status").read_text()
        except OSError:
            break
        rss_kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), None)
        if rss_kb is None:  # the process is exiting: its memory is already gone from /proc
            break
        samples.append((rows_in(out) if len(samples) % 10 == 0 else -1, rss_kb))
        time.sleep(0.2)
    try:
        job.wait(timeout=120)  # sampling may stop while the process is still exiting
    except subprocess.TimeoutExpired:
        job.kill()
        job.wait()
    assert job.returncode == 0, log.read_text()[-3000:]
    peak_mb = max(r for _, r in samples) / 1024
    progressed = [(rows, r) for rows, r in samples if rows >= 0]
    early = [r for rows, r in progressed if 0 < rows < n // 3]
    late = [r for rows, r in progressed if rows >= 2 * n // 3]
    result = exactness(out, parts, n)
    report(f"burst of 12000 queued messages ({client})", 1, n, result,
           f"(peak RSS {peak_mb:.0f} MiB; supervisor restarts after a stall: {restarts_of(job)})")
    assert result["lost"] == 0 and result["duplicated"] == 0
    assert peak_mb < 3072
    if early and late:
        assert max(late) / 1024 - max(early) / 1024 < 300, "resident memory keeps growing with the backlog"


def test_supervisor_restarts_only_stalled_runs(tmp_path):
    """The harness restarts exit 75 and the backstop's exit 1, and nothing else (no model, no broker)."""
    from tests.jobs.faults import Supervised

    state, log = tmp_path / "runs", tmp_path / "sup.log"
    script = (f"import sys; p = {str(state)!r}; n = len(open(p).read()) if __import__('os').path.exists(p) else 0; "
              "open(p, 'a').write('x'); codes = sys.argv[1:]; c = int(codes[n]) if n < len(codes) else 0; "
              "print('Timeout (0:01:30)!' if c == 1 else f'run {n}', flush=True); sys.exit(c)")
    proc = Supervised([sys.executable, "-c", script, "75", "1", "3", "--max-messages", "5"], dict(os.environ), log)
    assert proc.wait(timeout=60) == 3  # 75 and a backstop exit 1 were restarted, the real error 3 is final
    assert proc.restarts == [75, 1]
    assert "--max-messages" not in proc.cmd and proc.cmd[-2:] == ["--idle-timeout", "10"]
    assert "run 0" in log.read_text() and "Timeout (" in log.read_text() and "run 2" in log.read_text()
    state.unlink()
    plain = Supervised([sys.executable, "-c", script, "1"], dict(os.environ), None)
    assert plain.wait(timeout=60) == 1 and plain.restarts == []  # without a log the dump cannot be seen: exit 1 is final
