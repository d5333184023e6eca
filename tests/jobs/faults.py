"""Helpers for the fault-injection tests: run the real CLI, check exactness."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from nlpstream.jobs.stream import STALL_EXIT_CODE
from tests.conftest import read_output


HARD_STALL_MARK = "Timeout ("  # faulthandler's first line when the GIL-free backstop fires (then exit 1)


class Supervised:
    """One stream worker run the way a process supervisor (Kubernetes) runs it.

    A worker that ended itself because it stalled (the liveness watchdog's
    exit 75, or exit 1 after the GIL-free backstop's "Timeout (" dump) is
    started again with the same arguments, as ``restartPolicy`` would; any
    other exit, and a kill by the test, is final. Each run writes its own log,
    appended to ``log`` when it ends. The Popen-like surface (pid, poll, wait,
    kill, returncode) is what the tests use.
    """

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path | None) -> None:
        self.cmd, self.env, self.log = cmd, env, log
        self.restarts: list[int] = []  # exit codes of the stalled runs that were restarted
        self._killed = False
        self._final: int | None = None
        self._runs = 0
        self._start()

    def _start(self) -> None:
        self._runs += 1
        self._own_log = self.log.with_name(f"{self.log.name}.{id(self)}.{self._runs}") if self.log else None
        sink = open(self._own_log, "w") if self._own_log else subprocess.DEVNULL  # noqa: SIM115 - child owns it
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=sink, stderr=subprocess.STDOUT, text=True)
        if self._own_log:
            sink.close()

    def _ended(self, code: int) -> bool:
        """Collect the run's log; restart a stalled run. True when the exit is final."""
        text = self._own_log.read_text(errors="replace") if self._own_log and self._own_log.exists() else ""
        if self._own_log and self.log:
            with open(self.log, "a") as combined:
                combined.write(text)
            self._own_log.unlink(missing_ok=True)
        stalled = code == STALL_EXIT_CODE or (code == 1 and HARD_STALL_MARK in text)
        if stalled and not self._killed:
            self.restarts.append(code)
            if "--max-messages" in self.cmd:  # a restarted run resumes mid-stream: it cannot count to N, so it
                i = self.cmd.index("--max-messages")  # stops when idle instead
                self.cmd = [*self.cmd[:i], *self.cmd[i + 2:], *(() if "--idle-timeout" in self.cmd
                                                                 else ("--idle-timeout", "10"))]
            self._start()
            return False
        return True

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self._final

    def poll(self) -> int | None:
        while self._final is None:
            code = self.proc.poll()
            if code is None:
                return None
            if self._ended(code):
                self._final = code
        return self._final

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._final is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            code = self.proc.wait(timeout=left)
            if self._ended(code):
                self._final = code
        return self._final

    def kill(self) -> None:
        self._killed = True
        self.proc.kill()


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> list[int | None]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return [consumer.committed(TopicPartition(topic, p)) for p in range(partitions)]
    finally:
        consumer.close()


def stream_proc(bootstrap: str, topic: str, out: Path, group: str, *extra: str, log: Path | None = None,
                env: dict[str, str] | None = None) -> Supervised:
    cmd = [sys.executable, "-m", "nlpstream.jobs.cli", "stream", "--bootstrap-servers", bootstrap, "--topic", topic,
           "--group-id", group, "--output", str(out), "--devices", "cpu", "--flush-interval", "0.3",
           "--metrics-port", "0", *extra]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", NLPSTREAM_KAFKA__SESSION_TIMEOUT_MS="6000",
                    NLPSTREAM_STALL_TIMEOUT="60", NLPSTREAM_KAFKA__FETCH_STALL_TIMEOUT="20", **(env or {}))
    proc = Supervised(cmd, full_env, log)
    STARTED.append(proc)
    return proc


STARTED: list[Supervised] = []  # reaped after each test, whatever its outcome


def restarts_of(*procs: Supervised) -> int:
    return sum(len(p.restarts) for p in procs)


def reap() -> None:
    """Kill every job a test started and left running (a failed assertion mid-test)."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def files(out: Path) -> list[Path]:
    return list(out.glob("topic=*/date=*/part-*.parquet"))


def rows_in(out: Path) -> int:
    return read_output(out).num_rows if files(out) else 0


def wait_for(predicate: Any, timeout_s: float, what: str, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def exactness(out: Path, partitions: int, n: int) -> dict[str, int]:
    """Lost and duplicated counts of offsets 0..end per partition against ``n`` produced in all."""
    table = read_output(out) if files(out) else None
    pairs = list(zip(table.column("partition").to_pylist(), table.column("offset").to_pylist())) if table else []
    counts = Counter(pairs)
    duplicated = sum(c - 1 for c in counts.values() if c > 1)
    per_partition = Counter(p for p, _ in counts)
    lost = n - len(counts)
    gaps = 0
    for p in range(partitions):
        offsets = sorted(o for q, o in counts if q == p)
        gaps += (offsets[-1] + 1 - len(offsets)) if offsets else 0
    return {"rows": len(pairs), "lost": lost, "duplicated": duplicated, "gaps": gaps,
            "partitions_seen": len(per_partition)}


def own_broker_with_topic(data: Path, topic: str, partitions: int, messages: list[Any]) -> Any:
    """A broker of the test's own (so the test may stop it) with ``topic`` holding ``messages``; the caller
    stops it with ``kafka_local.stop(data)``."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    from nlpstream.consumers import kafka_local
    from tests.conftest import produce

    info = kafka_local.start(data, port=0, timeout_s=120)
    try:
        admin = KafkaAdminClient(bootstrap_servers=info.bootstrap_servers)
        admin.create_topics([NewTopic(topic, partitions, 1)])
        admin.close()
        produce(info.bootstrap_servers, topic, messages)
    except BaseException:
        kafka_local.stop(data)
        raise
    return info


# -- kafka.transactions: dead letters and alerts read back as read_committed and default readers see them ------------
TXN_ENV = {"NLPSTREAM_KAFKA__TRANSACTIONS": "true", "NLPSTREAM_ALERTS__MESSAGE_LABEL": "negative",
           "NLPSTREAM_ALERTS__MESSAGE_MIN_SCORE": "0.0"}


def txn_env(topic: str, **extra: str) -> dict[str, str]:
    """A transactional job's environment: every negative message alerts to ``<topic>.alerts``; dead letters go to
    the default ``<topic>.dlq``."""
    return {**TXN_ENV, "NLPSTREAM_ALERTS__ALERT_TOPIC": f"{topic}.alerts", **extra}


def dirty_corpus(n: int, prefix: str) -> tuple[list[tuple[bytes | None, bytes | None]], int]:
    """JSON messages with every 8th replaced by a record that cannot be decoded (``prefix-i`` ids otherwise)."""
    from tests.conftest import json_messages

    bad = [b"\xff\xfe", b"", None, b"{nope", b"[1]", b'{"x": 1}', b'{"text": 3}', b'{"text": " "}']
    messages = json_messages(n, prefix=prefix)
    dead = 0
    for i in range(0, n, 8):
        messages[i] = (messages[i][0], bad[(i // 8) % len(bad)])
        dead += 1
    return messages, dead


def dirty_topic(bootstrap: str, make_topic: Any, unique: str, partitions: int, n: int) -> tuple[str, int]:
    """A new topic holding ``dirty_corpus(n, unique)``; its name and how many of its records are undecodable."""
    from tests.conftest import produce

    topic = make_topic(unique, partitions=partitions)
    messages, dead = dirty_corpus(n, unique)
    produce(bootstrap, topic, messages)
    return topic, dead


def good_ids(n: int, prefix: str) -> list[str]:
    """The ids of the decodable messages of ``dirty_corpus(n, prefix)``."""
    return [f"{prefix}-{i}" for i in range(n) if i % 8]


def read_all(bootstrap: str, topic: str, isolation: str, timeout_s: float = 20.0) -> list[Any]:
    """Every record of ``topic`` up to its end offsets now (read_committed stops at the last stable offset)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                             isolation_level=isolation)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(consumer.position(tp) < ends[tp] for tp in tps):
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def end_offsets(bootstrap: str, topic: str, partitions: int) -> list[int]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return [ends[TopicPartition(topic, p)] for p in range(partitions)]
    finally:
        consumer.close()


def dead_keys(records: list[Any]) -> Counter[tuple[bytes, bytes, bytes]]:
    def key(r: Any) -> tuple[bytes, bytes, bytes]:
        h = dict(r.headers)
        return h["nlpstream.source.topic"], h["nlpstream.source.partition"], h["nlpstream.source.offset"]

    return Counter(key(r) for r in records)


def check_txn_topics(bootstrap: str, topic: str, dead_expected: int, what: str,
                     alert_ids: set[str] | None = None) -> dict[str, int]:
    """read_committed sees each dead letter and alert once; read_uncommitted sees them all (maybe repeated).

    ``alert_ids``: the ids of the messages the output labels negative; each must have its one alert.
    """
    import json

    dlq = dead_keys(read_all(bootstrap, f"{topic}.dlq", "read_committed"))
    dlq_all = dead_keys(read_all(bootstrap, f"{topic}.dlq", "read_uncommitted"))
    committed_alerts = read_all(bootstrap, f"{topic}.alerts", "read_committed")
    alerts = Counter(r.key for r in committed_alerts)
    alerts_all = Counter(r.key for r in read_all(bootstrap, f"{topic}.alerts", "read_uncommitted"))
    result = {"dead": len(dlq), "dead_dup_committed": sum(dlq.values()) - len(dlq),
              "dead_dup_uncommitted": sum(dlq_all.values()) - len(dlq_all),
              "alerts": len(alerts), "alerts_dup_committed": sum(alerts.values()) - len(alerts),
              "alerts_dup_uncommitted": sum(alerts_all.values()) - len(alerts_all)}
    print(f"\nTXN-TABLE | {what} | {result}")
    assert len(dlq) == dead_expected and result["dead_dup_committed"] == 0, result
    assert set(dlq_all) == set(dlq), "a default reader still reads every dead letter"
    assert alerts and result["alerts_dup_committed"] == 0, result
    assert set(alerts_all) == set(alerts), "an alert seen only in an aborted transaction was lost"
    if alert_ids is not None:
        ids = Counter(json.loads(r.value)["message_id"] for r in committed_alerts)
        assert set(ids) == alert_ids and max(ids.values()) == 1, \
            f"alerts: {len(ids)} ids, {len(alert_ids)} negative rows, {len(set(ids) ^ alert_ids)} differ"
    return result
