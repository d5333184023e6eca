"""``nlpstream bench --pipeline``: the host path of the stream job, side by side in one run.

On one topic of JSON messages on a real broker (the local launcher unless
``--bootstrap-servers`` names one), measured in the same run:

1. a bare confluent-kafka consumer reading the topic (the ceiling of the
   client side);
2. the stream job with an *instant* engine (labels without computing):
   everything the job does besides inference, with each consumer client
   (``kafka.client``: kafka-python, the default, and confluent), and with
   confluent as several processes of one consumer group (what ``nlpstream
   stream --workers N`` runs; one per core by default); 1. and 2. run in
   ``rounds`` alternating rounds, best of each;
3. the stream job with a *simulated device* that sleeps ``len(texts) / D``
   seconds per call (sleeping releases the GIL, as a GPU does), ``D`` set to
   ``device_share`` (0.6) of the instant rate: the share of time the device is
   kept busy, unpipelined (``pipeline_depth`` 0), pipelined with every flush
   on the loop's thread (``output.background_flush`` off), and as configured
   by default (pipelined, flushes beside the loop);
4. the engine with an instant runner beside the tokenizer alone, on the same
   texts (the engine's host side), with a GPU's batch limits (the instant
   runner stands in for a fast device) and, for reference, the CPU's;
5. with ``model_messages`` > 0: the stream job with the builtin model on CPU
   against that engine alone on the same texts (two alternating rounds, best
   of each).

Rates are counted from the first to the last call into the engine, so
consumer-group start-up is not part of them.
"""

from __future__ import annotations

import functools
import json
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nlpstream.inference import Prediction

_PRED = Prediction(label="neutral", score=1.0, probs={"neutral": 1.0})


class StandInEngine:
    """Answers every text with one label; sleeps ``seconds_per_text`` per text to stand in for a device."""

    model_name = "stand-in"

    def __init__(self, seconds_per_text: float = 0.0) -> None:
        self.seconds_per_text = seconds_per_text
        self.texts = 0
        self.busy_s = 0.0
        self.first: float | None = None
        self.last = 0.0
        self._lock = threading.Lock()

    def classify(self, texts: list[str]) -> list[Prediction]:
        start = time.perf_counter()
        if self.seconds_per_text:
            time.sleep(len(texts) * self.seconds_per_text)
        end = time.perf_counter()
        with self._lock:
            self.first = start if self.first is None else self.first
            self.last = end
            self.texts += len(texts)
            self.busy_s += end - start
        return [_PRED] * len(texts)

    def close(self) -> None:
        pass

    def rate(self) -> float:
        window = self.last - (self.first or self.last)
        return self.texts / window if window > 0 else 0.0

    def utilisation(self) -> float:
        window = self.last - (self.first or self.last)
        return self.busy_s / window if window > 0 else 0.0


class _TimedEngine:
    """Wraps a real engine to time the window between its first and last call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.model_name = inner.model_name
        self.first: float | None = None
        self.last = 0.0
        self.texts = 0

    def classify_each(self, texts: list[str]) -> list[Any]:
        start = time.perf_counter()
        out = self.inner.classify_each(texts)
        self.first = start if self.first is None else self.first
        self.last = time.perf_counter()
        self.texts += len(texts)
        return out

    def classify(self, texts: list[str]) -> list[Any]:
        return self.inner.classify(texts)

    def close(self) -> None:
        pass


def _texts(n: int) -> list[str]:
    from nlpstream.inference.bench import make_corpus

    base = make_corpus(min(n, 5000))
    return [base[i % len(base)] + ("" if i < len(base) else f" #{i}") for i in range(n)]


def _produce(bootstrap: str, topic: str, texts: list[str], partitions: int) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        fut.result(30)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1 << 20,
                         "compression.type": "lz4", "acks": "all"})
    for i, text in enumerate(texts):
        value = json.dumps({"id": f"m{i}", "text": text}).encode()
        while True:
            try:
                producer.produce(topic, value=value, key=f"k{i}".encode())
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10000 == 0:
            producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError("the bench producer could not deliver every message")


def _bare_consumer_rate(bootstrap: str, topic: str, n: int) -> float:
    from confluent_kafka import Consumer

    # the job's fetch.queue.backoff.ms: with librdkafka's 1 s default, topics of 300,000 and 600,000
    # messages here held this consumer to about 258,000 msg/s (1.3-1.4 million with 20 ms)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "fetch.queue.backoff.ms": 20})
    consumer.subscribe([topic])
    seen, first, first_count, deadline = 0, None, 0, time.monotonic() + 300
    try:
        while seen < n and time.monotonic() < deadline:
            batch = consumer.consume(num_messages=2000, timeout=1.0)
            seen += sum(1 for m in batch if m.error() is None)
            if seen and first is None:  # steady state: the clock starts once the first records are in hand
                first, first_count = time.perf_counter(), seen
        end = time.perf_counter()
    finally:
        consumer.close()
    return (seen - first_count) / (end - first) if first and end > first and seen > first_count else 0.0


def _job_config(bootstrap: str, topic: str, group: str, out: Path | str, **settings: Any) -> Any:
    """The bench's stream job settings (no /metrics) with dotted ``settings`` on top."""
    from nlpstream.jobs.config import StreamConfig, load_config

    cfg = load_config(StreamConfig, None, {"kafka.bootstrap_servers": bootstrap, "kafka.topics": [topic],
                                           "kafka.group_id": group, "output.output": str(out), **settings})
    cfg.metrics.metrics_port = None
    return cfg


def _run_job(bootstrap: str, topic: str, n: int, engine: Any, out: Path, depth: int | None = None,
             client: str = "kafka-python", background_flush: bool = True) -> Any:
    from nlpstream.jobs.stream import StreamJob

    cfg = _job_config(bootstrap, topic, f"bench-{uuid.uuid4().hex[:8]}", out, **{
        "max_messages": n, "idle_timeout": 60.0, "pipeline_depth": depth, "kafka.client": client,
        "output.background_flush": background_flush})
    return StreamJob(cfg, engine=engine).run()


def _job_process() -> None:
    """One of :func:`_jobs_in_processes`' processes (``python -c``): the job with an instant engine.

    Its argument is JSON (bootstrap, topic, group, output); it says ``ready`` on stdout once configured,
    starts on a line on stdin, stops after 2 idle seconds once the topic is read, and prints its
    engine's [first call, last call, texts] as JSON.
    """
    import sys

    from nlpstream.jobs.stream import StreamJob

    bootstrap, topic, group, out = json.loads(sys.argv[1])
    cfg = _job_config(bootstrap, topic, group, out, **{"idle_timeout": 2.0, "kafka.client": "confluent"})
    engine = StandInEngine()
    print("ready", flush=True)
    if sys.stdin.readline() != "go\n":  # every process imported and configured: they join the group together
        return
    StreamJob(cfg, engine=engine).run()
    print(json.dumps([engine.first, engine.last, engine.texts]), flush=True)


def _jobs_in_processes(bootstrap: str, topic: str, messages: int, processes: int, out: Path) -> tuple[float, int]:
    """The confluent job as ``processes`` processes of one group (what ``--workers`` runs), instant engines.

    Returns (the topic's ``messages`` over the time from the first engine call of any process to the last;
    the rows in the output, which should be ``messages``). The clocks are ``time.perf_counter``, which is
    the system-wide monotonic clock on Linux, so the processes' times compare.
    """
    import contextlib
    import select
    import subprocess
    import sys

    import pyarrow.dataset as ds

    group = f"bench-{uuid.uuid4().hex[:8]}"
    code = "from nlpstream.jobs.pipeline_bench import _job_process; _job_process()"
    deadline = time.monotonic() + 600

    def line_of(proc: subprocess.Popen[str]) -> str:
        """The process's next line on stdout, or "" when it ended or the bench's 10 minutes are up."""
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        return proc.stdout.readline() if ready else ""  # type: ignore[union-attr]

    procs: list[subprocess.Popen[str]] = []
    ends = []
    try:
        for _ in range(processes):
            procs.append(subprocess.Popen([sys.executable, "-c", code, json.dumps([bootstrap, topic, group, str(out)])],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for proc in procs:
            if line_of(proc).strip() != "ready":
                raise RuntimeError(f"a bench job process failed to start (exit {proc.poll()})")
        for proc in procs:
            proc.stdin.write("go\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        for proc in procs:
            line = line_of(proc)
            if not line:
                raise RuntimeError(f"a bench job process failed or took too long (exit {proc.poll()})")
            ends.append(json.loads(line))
    finally:
        for proc in procs:
            with contextlib.suppress(OSError):  # one that died leaves a broken pipe
                proc.stdin.close()  # type: ignore[union-attr]  # one that waits for "go" ends at end of file
        for proc in procs:
            try:
                proc.wait(60 if ends else 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    firsts = [first for first, _, texts in ends if first is not None and texts]
    window = max(last for _, last, _ in ends) - min(firsts) if firsts else 0.0
    rows = ds.dataset(str(out), format="parquet", partitioning="hive").count_rows()
    return (messages / window if window > 0 else 0.0), rows


def _engine_host_side(texts: list[str], rounds: int = 3) -> dict[str, float]:
    """The engine with an instant runner beside the Rust tokenizer's batch encode of the same texts.

    Measured in ``rounds`` alternating rounds (tokenizer, engine with a GPU's
    batch limits, engine with the CPU's), best of each, so a slow spell of a
    shared machine does not fall on one side only, under the garbage collector
    settings the stream job calls the engine with (:mod:`nlpstream.jobs.gc_tuning`):
    without them the collector's full scans of start-up's objects, set off by
    the engine's result objects, cost it about 14 us a text of its caller's
    thread (measured with ``time.thread_time``: 33 us against 19 us).
    """
    import torch

    from nlpstream.inference.engine import GPU_BATCH_LIMITS, Engine, batch_encoder
    from nlpstream.inference.model import load_model
    from nlpstream.jobs.gc_tuning import tuned_gc

    class InstantRunner:
        name, concurrency = "instant", 1

        def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return torch.full((input_ids.shape[0], 3), 1 / 3)

    def timed(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    bundle = load_model("builtin:sentiment")
    engines: dict[str, Engine] = {}
    try:
        # the instant runner stands in for a fast device: the GPU's batch limits (the CPU's would time
        # 32-text batches), and the CPU's for reference
        for name, limits in (("gpu", GPU_BATCH_LIMITS), ("cpu", {})):
            engines[name] = Engine(bundle, ["cpu"], "fp32", cache_entries=0, min_agreement=0,
                                   runner_factory=lambda mode, device: InstantRunner(), **limits)
        backend = engines["gpu"]._backend

        def tokenize() -> Any:  # the tokenizer's own batch encode of the same texts, as the engine truncates them
            if backend is not None:
                return batch_encoder(backend)(texts, add_special_tokens=True)  # the fastest, as the engine
            return bundle.tokenizer(texts, truncation=True, max_length=bundle.max_length, add_special_tokens=True,
                                    return_attention_mask=False, return_token_type_ids=False)

        tokenize()
        for engine in engines.values():  # warm-up, large enough to go through the parts path
            engine.classify(texts[: 2 * engine._part_texts])
        best = dict.fromkeys(["tokenizer", *engines], float("inf"))
        with tuned_gc():  # both sides under the collector settings the jobs run the engine with
            for _ in range(rounds):
                best["tokenizer"] = min(best["tokenizer"], timed(tokenize))
                for name, engine in engines.items():
                    best[name] = min(best[name], timed(functools.partial(engine.classify, texts)))
    finally:
        for engine in engines.values():
            engine.close()
    return {"engine_instant_runner_texts_per_s": round(len(texts) / best["gpu"], 1),
            "tokenizer_texts_per_s": round(len(texts) / best["tokenizer"], 1),
            "engine_vs_tokenizer": round(best["tokenizer"] / best["gpu"], 3),
            "engine_instant_runner_cpu_limits_texts_per_s": round(len(texts) / best["cpu"], 1),
            "engine_cpu_limits_vs_tokenizer": round(best["tokenizer"] / best["cpu"], 3)}


class _SchemasInMemory:
    """Serves fixed schemas by id: the decode measurement times decoding, not the registry's HTTP."""

    def __init__(self, schemas: dict[int, tuple[str, str]]) -> None:
        self.schemas = schemas

    def get_schema(self, schema_id: int) -> Any:
        from types import SimpleNamespace

        text, kind = self.schemas[schema_id]
        return SimpleNamespace(schema_str=text, schema_type=kind, references=[])


_AVRO_SCHEMA = {"type": "record", "name": "Msg", "fields": [{"name": "id", "type": "string"},
                                                             {"name": "text", "type": "string"}]}
_JSON_SCHEMA = {"type": "object", "properties": {"id": {"type": "string"}, "text": {"type": "string"}},
                "required": ["id", "text"]}
_PROTO = 'syntax = "proto3";\nmessage Msg { string id = 1; string text = 2; }\n'


def _each(fn: Callable[[Any], Any], items: list[Any]) -> None:
    """Call ``fn`` on every item, keeping no result (timed: results kept alive would cost allocations)."""
    for item in items:
        fn(item)


def _best_seconds(fn: Callable[[], Any], rounds: int = 2) -> float:
    """The shortest of ``rounds`` timed calls of ``fn``."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def decode_rates(texts: list[str]) -> dict[str, float]:
    """Records/s of the job's decode step for JSON and for each schema'd format, on the same texts, one run.

    Each format decodes the same {id, text} records with the schema already
    fetched (as in steady state); ratios are against plain JSON.
    """
    import io
    import struct

    import fastavro
    from google.protobuf import descriptor_pool, message_factory

    from nlpstream.consumers import DecodeSettings, InputRecord, decode_record
    from nlpstream.consumers.schema_registry import RegistryDecoder, _descriptor_protos

    objs = [{"id": f"m{i}", "text": t} for i, t in enumerate(texts)]
    pool = descriptor_pool.DescriptorPool()
    for f in _descriptor_protos(3, _PROTO, []):
        pool.Add(f)
    proto_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("Msg"))
    avro = fastavro.parse_schema(_AVRO_SCHEMA)

    def avro_bytes(o: dict[str, str]) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, avro, o)
        return buf.getvalue()

    head = {i: struct.pack(">bI", 0, i) for i in (1, 2, 3)}
    payloads = {
        "json": [json.dumps(o).encode() for o in objs],
        "avro": [head[1] + avro_bytes(o) for o in objs],
        "json-schema": [head[2] + json.dumps(o).encode() for o in objs],
        "protobuf": [head[3] + b"\x00" + proto_cls(**o).SerializeToString() for o in objs],
    }
    client = _SchemasInMemory({1: (json.dumps(_AVRO_SCHEMA), "AVRO"), 2: (json.dumps(_JSON_SCHEMA), "JSON"),
                               3: (_PROTO, "PROTOBUF")})
    out: dict[str, float] = {}
    for fmt, values in payloads.items():
        registry = None
        if fmt != "json":
            registry = RegistryDecoder(fmt, "in-memory", client=client)
            registry.resolve(registry.unresolved(values[:1]))
        settings = DecodeSettings(fmt, "text", "id", registry=registry)  # type: ignore[arg-type]
        records = [InputRecord("t", 0, i, None, v, 0, ()) for i, v in enumerate(values)]
        best = _best_seconds(functools.partial(_each, functools.partial(decode_record, settings=settings), records))
        out[f"decode_{fmt.replace('-', '_')}_records_per_s"] = round(len(records) / best, 1)
    base = out["decode_json_records_per_s"]
    for fmt in ("avro", "json_schema", "protobuf"):
        out[f"decode_{fmt}_vs_json"] = round(out[f"decode_{fmt}_records_per_s"] / base, 3)
    # the stream job's decode of plain JSON: a micro-batch's columns at once (jobs/handling.py decode_columns)
    from nlpstream.jobs.handling import decode_columns

    settings = DecodeSettings("json", "text", "id", keep_fields=())
    records = [InputRecord("t", 0, i, None, v, 0, ()) for i, v in enumerate(payloads["json"])]
    batches = [records[i:i + 512] for i in range(0, len(records), 512)]  # the job's default micro-batch
    best = _best_seconds(functools.partial(_each, functools.partial(decode_columns, settings=settings), batches))
    out["decode_json_columns_records_per_s"] = round(len(records) / best, 1)
    out["decode_json_columns_vs_json"] = round(out["decode_json_columns_records_per_s"] / base, 3)
    return out


def run_pipeline_bench(bootstrap: str | None = None, messages: int = 200_000, partitions: int = 6,
                       device_share: float = 0.6, model_messages: int = 3000, rounds: int = 2,
                       processes: int | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the measurements above in one go; returns the figures and ratios (see the module docstring).

    ``processes``: how many processes of one group the several-process row runs (default: the machine's
    cores, at most ``partitions``; 1 leaves the row out).
    """
    import os

    processes = processes if processes is not None else max(1, min(os.cpu_count() or 1, partitions))
    broker_dir = None
    if bootstrap is None:
        from nlpstream.consumers import kafka_local

        broker_dir = tempfile.mkdtemp(prefix="nlpstream-bench-broker-")
        bootstrap = kafka_local.start(broker_dir, port=0, timeout_s=120).bootstrap_servers
    result: dict[str, Any] = {"messages": messages, "partitions": partitions}
    try:
        texts = _texts(messages)
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        _produce(bootstrap, topic, texts, partitions)
        with tempfile.TemporaryDirectory() as tmp:
            # alternating rounds, best of each: the bare consumer's figure swings with the machine's load
            bare, best = 0.0, {"kafka-python": StandInEngine(), "confluent": StandInEngine()}
            several, several_rows = 0.0, 0
            for r in range(rounds):
                bare = max(bare, _bare_consumer_rate(bootstrap, topic, messages))
                for client in best:
                    engine = StandInEngine()
                    _run_job(bootstrap, topic, messages, engine, Path(tmp) / f"instant-{client}-{r}", client=client)
                    if engine.rate() > best[client].rate():
                        best[client] = engine
                if processes > 1:
                    rate, rows_done = _jobs_in_processes(bootstrap, topic, messages, processes,
                                                          Path(tmp) / f"processes-{r}")
                    several, several_rows = (rate, rows_done) if rate > several else (several, several_rows)
            instant, confluent = best["kafka-python"], best["confluent"]
            result["bare_confluent_consumer_msgs_per_s"] = round(bare, 1)
            echo(f"  bare confluent-kafka consumer        {bare:>10.1f} msg/s (best of {rounds})")
            result["job_instant_engine_msgs_per_s"] = round(instant.rate(), 1)
            result["job_instant_vs_bare_consumer"] = round(instant.rate() / bare, 3)
            echo(f"  stream job, instant engine          {instant.rate():>10.1f} msg/s "
                 f"({result['job_instant_vs_bare_consumer']}x the bare consumer)")
            result["job_instant_engine_confluent_client_msgs_per_s"] = round(confluent.rate(), 1)
            result["job_instant_confluent_client_vs_bare_consumer"] = round(confluent.rate() / bare, 3)
            result["job_instant_confluent_vs_kafka_python_client"] = round(confluent.rate() / instant.rate(), 3)
            echo(f"  the same, kafka.client confluent    {confluent.rate():>10.1f} msg/s "
                 f"({result['job_instant_confluent_client_vs_bare_consumer']}x the bare consumer, "
                 f"{result['job_instant_confluent_vs_kafka_python_client']}x kafka-python)")
            if processes > 1:
                result["job_instant_confluent_processes"] = processes
                result["job_instant_confluent_processes_msgs_per_s"] = round(several, 1)
                result["job_instant_confluent_processes_rows_written"] = several_rows
                result["job_instant_confluent_processes_vs_bare_consumer"] = round(several / bare, 3)
                result["job_instant_confluent_processes_vs_one_process"] = round(several / confluent.rate(), 3)
                echo(f"  the same, {processes} processes in one group {several:>10.1f} msg/s "
                     f"({result['job_instant_confluent_processes_vs_bare_consumer']}x the bare consumer, "
                     f"{result['job_instant_confluent_processes_vs_one_process']}x one process)")
            device_rate = device_share * instant.rate()
            result["simulated_device_texts_per_s"] = round(device_rate, 1)
            for depth, background, key, what in (
                    (0, True, "simulated_device_busy_share_unpipelined", "pipeline_depth 0"),
                    (None, False, "simulated_device_busy_share_flush_on_loop", "flushes on the loop"),
                    (None, True, "simulated_device_busy_share", "default settings")):
                device = StandInEngine(seconds_per_text=1.0 / device_rate)
                _run_job(bootstrap, topic, messages, device, Path(tmp) / f"device-{key}", depth=depth,
                         background_flush=background)
                result[key] = round(device.utilisation(), 3)
                echo(f"  stream job, device at {device_rate:.0f} texts/s, {what}: "
                     f"busy {device.utilisation():.1%} of the time")
        host = _engine_host_side(texts[: min(len(texts), 50_000)])
        result.update(host)
        echo(f"  engine, instant runner, GPU limits  {host['engine_instant_runner_texts_per_s']:>10.1f} texts/s "
             f"({host['engine_vs_tokenizer']}x the tokenizer's {host['tokenizer_texts_per_s']:.1f})")
        echo(f"  engine, instant runner, CPU limits  {host['engine_instant_runner_cpu_limits_texts_per_s']:>10.1f} texts/s "
             f"({host['engine_cpu_limits_vs_tokenizer']}x)")
        decode = decode_rates(texts[: min(len(texts), 50_000)])
        result.update(decode)
        echo("  decode step (records/s, schema fetched): " + ", ".join(
            f"{fmt} {decode[f'decode_{fmt}_records_per_s']:.0f}"
            + ("" if fmt == "json" else f" ({decode[f'decode_{fmt}_vs_json']}x json)")
            for fmt in ("json", "avro", "json_schema", "protobuf"))
             + f"; json as the stream job decodes a batch's columns {decode['decode_json_columns_records_per_s']:.0f} "
               f"({decode['decode_json_columns_vs_json']}x)")
        if model_messages:
            result.update(_model_on_cpu(bootstrap, texts[:model_messages], echo))
    finally:
        if broker_dir is not None:
            from nlpstream.consumers import kafka_local

            kafka_local.stop(broker_dir)
    return result


def _model_on_cpu(bootstrap: str, texts: list[str], echo: Callable[[str], None], rounds: int = 2) -> dict[str, float]:
    """The builtin model on CPU: the engine alone on ``texts`` (one call) and the stream job on the same texts,
    in ``rounds`` alternating rounds, best of each (a slow spell of a shared machine falls on both sides)."""
    from nlpstream.inference import load_engine

    topic = f"bench-model-{uuid.uuid4().hex[:8]}"
    _produce(bootstrap, topic, texts, 3)
    alone = in_job = 0.0
    with load_engine("builtin:sentiment", "cpu", "auto", cache_entries=0) as engine:
        engine.classify(texts[:256])
        for _ in range(rounds):
            start = time.perf_counter()
            engine.classify(texts)
            alone = max(alone, len(texts) / (time.perf_counter() - start))
            timed = _TimedEngine(engine)
            with tempfile.TemporaryDirectory() as tmp:
                _run_job(bootstrap, topic, len(texts), timed, Path(tmp))
            if timed.first and timed.last > timed.first:
                in_job = max(in_job, timed.texts / (timed.last - timed.first))
    echo(f"  builtin model on CPU: stream job {in_job:.1f} msg/s, engine alone {alone:.1f} texts/s "
         f"({in_job / alone:.2f}x)")
    return {"model_engine_alone_texts_per_s": round(alone, 1), "model_job_msgs_per_s": round(in_job, 1),
            "model_job_vs_engine": round(in_job / alone, 3)}
