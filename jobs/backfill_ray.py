"""The Ray executor of the file backfill: the same pieces, read by Ray Data, labeled by an actor pool.

Read tasks (one per input file) stream each file with
:func:`backfill_inputs.read_pieces` and hand every unfinished piece to Ray
Data as one block, tagged with its topic, partition and first row. A pool of
callable-class actors, one per GPU of the cluster (or, without GPUs, one per
CPU slot: the cluster's CPUs less one for the readers), each loads the
engine once and labels and commits pieces with
:func:`backfill.label_piece`, so files, rejects and markers get the same
deterministic names as with ``--executor local`` and a rerun on either
executor resumes the other's run. The driver plans (checks inputs, cleans up
a killed run's leftovers), then only counts the small result rows for the
progress bar and the summary. ``address`` joins a running cluster;
without it a local Ray instance starts and stops with the job (an already
initialised Ray in this process is used as is).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pyarrow as pa

from nlpstream.jobs import metrics
from nlpstream.jobs.backfill import BackfillSummary, PieceResult, Tracker, label_piece, plan_inputs, total_rows
from nlpstream.jobs.backfill_inputs import BackfillError, InputFile, Piece, read_pieces
from nlpstream.jobs.backfill_output import BackfillOutput, Range, covered
from nlpstream.jobs.config import BackfillConfig

log = logging.getLogger(__name__)
_TOPIC, _PARTITION, _ROW, _SOURCE = "_nlpstream_topic", "_nlpstream_partition", "_nlpstream_row", "_nlpstream_source"


def _tagged(piece: Piece) -> pa.Table:
    n = piece.table.num_rows
    return (piece.table
            .append_column(_TOPIC, pa.array([piece.topic] * n, pa.string()))
            .append_column(_PARTITION, pa.array([piece.partition] * n, pa.int32()))
            .append_column(_ROW, pa.array(range(piece.first, piece.first + n), pa.int64()))
            .append_column(_SOURCE, pa.array([piece.source] * n, pa.string())))


def _runs(batch: pa.Table, piece_rows: int) -> list[Piece]:
    """The batch cut back into the reader's pieces (rows ``k * piece_rows`` .. of one input).

    Ray Data merges the small blocks a read task yields into bigger ones; a
    piece cut by a block boundary comes out as two runs, each committed with
    its own marker (the resume stays exact, only the file names differ).
    """
    topics, parts = batch.column(_TOPIC).to_pylist(), batch.column(_PARTITION).to_pylist()
    rows, sources = batch.column(_ROW).to_pylist(), batch.column(_SOURCE).to_pylist()
    data = batch.drop_columns([_TOPIC, _PARTITION, _ROW, _SOURCE])
    pieces, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or (topics[i], parts[i], sources[i]) != (topics[start], parts[start], sources[start]) \
                or rows[i] != rows[i - 1] + 1 or rows[i] // piece_rows != rows[start] // piece_rows:
            pieces.append(Piece(topics[start], parts[start], rows[start], sources[start],
                                data.slice(start, i - start)))
            start = i
    return pieces


def _make_source(files: list[InputFile], done: dict[tuple[str, int], list[Range]], cfg: BackfillConfig) -> Any:
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    text_field, id_field, rows, block = cfg.text_field, cfg.id_field, cfg.rows_per_file, cfg.read_block_bytes

    def read(f: InputFile, finished: list[Range]) -> Any:
        for piece in read_pieces(f, text_field, id_field, rows, block):
            if not covered(finished, piece.first, piece.last):
                yield _tagged(piece)

    class PieceSource(Datasource):
        """One read task per input file; each block one unfinished piece."""

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            return [ReadTask(lambda f=f: read(f, done[(f.topic, f.partition)]),
                             BlockMetadata(num_rows=None, size_bytes=None, input_files=[f.url], exec_stats=None))
                    for f in files]

    return PieceSource()


class PieceLabeler:
    """A Ray Data callable-class actor: loads the engine once, then labels and commits whole pieces."""

    def __init__(self, engine_options: dict[str, Any], output: dict[str, Any], text_field: str, id_field: str,
                 piece_rows: int, cpu_threads: int | None = None, gc_tuning: bool = True) -> None:
        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)
        from nlpstream.inference import load_engine
        from nlpstream.jobs.gc_tuning import tuned_gc

        self.engine = load_engine(**engine_options)
        # the actor's process labels until it ends: the settings stay (entered after loading, so the model is frozen)
        tuned_gc(gc_tuning).__enter__()
        self.out = BackfillOutput(**output)
        self.text_field, self.id_field, self.piece_rows = text_field, id_field, piece_rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = []
        for piece in _runs(batch, self.piece_rows):
            r = label_piece(piece, self.engine, self.out, self.text_field, self.id_field)
            results.append({"topic": r.topic, "seen": piece.table.num_rows, "rows": r.rows, "skipped": r.skipped,
                            "failed": json.dumps(r.failed), "labels": json.dumps(r.labels),
                            "files": json.dumps(r.files), "rejects": json.dumps(r.rejects)})
        return pa.Table.from_pylist(results)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """BackfillError unless something listens at ``host:port`` of ``address`` (``ray.init`` itself waits long
    for an address nobody answers at); ``auto`` and other forms are left to Ray."""
    import socket
    from urllib.parse import urlsplit

    split = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        host, port = split.hostname, split.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        return
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise BackfillError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from exc


def _start_ray(address: str | None) -> bool:
    """Connect to ``address`` or start a local instance; True when this call started (and so must stop) it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        _check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError: all mean "cannot reach"
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise BackfillError(f"cannot reach {where}: {type(exc).__name__}: {exc}") from exc
    return True


def run_backfill_ray(config: BackfillConfig, inputs: list[str], address: str | None = None, progress: Any = None,
                     actors: int | None = None) -> BackfillSummary:
    """Label every row of ``inputs`` on Ray Data; the same output, rejects and resume as the local executor.

    ``actors``: engine actors (default one per GPU, else the cluster's CPUs
    less one, at least one). Raises BackfillError (inputs; Ray unreachable),
    SinkError, and what an actor raised.
    """
    import ray
    from ray.data import DataContext

    summary = BackfillSummary(executor="ray")
    started = time.monotonic()
    out = BackfillOutput(config.output.output, config.output.include_text, config.output.compression,
                         storage_options=config.output.storage_options)
    files, done, summary.already_done = plan_inputs(config, inputs, out)
    total = total_rows(files)
    tracker = Tracker(progress, None if total is None else max(0, total - summary.already_done))
    if total is not None and summary.already_done >= total:  # a rerun of a finished job: no actor to start
        summary.seconds = time.monotonic() - started
        return summary
    owns = _start_ray(address)
    try:
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        engine_options = config.model.engine_options()
        if gpus:
            count, per_actor = actors or gpus, {"num_gpus": 1}
            engine_options["devices"] = "cuda"
        else:
            count, per_actor = actors or max(1, cpus - 1), {"num_cpus": 1}
            engine_options["devices"] = "cpu"
        log.info("ray: %d engine actors (%s) over %s", count, per_actor, resources)
        ds = ray.data.read_datasource(_make_source(files, done, config), num_cpus=0,
                                      override_num_blocks=max(1, len(files)))
        labeled = ds.map_batches(
            PieceLabeler, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(size=count),
            fn_constructor_kwargs={
                "engine_options": engine_options, "text_field": config.text_field, "id_field": config.id_field,
                "piece_rows": config.rows_per_file,
                "output": {"url": config.output.output, "include_text": config.output.include_text,
                           "compression": config.output.compression,
                           "storage_options": config.output.storage_options},
                "cpu_threads": None if gpus else 1, "gc_tuning": config.gc_tuning},
            **per_actor)
        for batch in labeled.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                summary.add(PieceResult(row["topic"], rows=row["rows"], skipped=row["skipped"],
                                        failed=json.loads(row["failed"]), labels=json.loads(row["labels"]),
                                        files=json.loads(row["files"]), rejects=json.loads(row["rejects"])))
                metrics.CONSUMED.labels(row["topic"]).inc(row["seen"])
                tracker.advance(row["seen"])
    finally:
        if owns:
            ray.shutdown()
    summary.seconds = time.monotonic() - started
    return summary
