"""Peak resident memory of the file backfill against the input size (a measurement, not a test).

    python -m nlpstream.jobs.backfill_bench --gb 3 --dir /tmp/bf-bench [--executor local|ray]

Generates a JSON-lines file and a Parquet file of about ``--gb`` GB each
(random words, ~250 bytes of text a row), then runs the backfill over each
in a fresh subprocess with an instant engine (every text "positive", no
model: the measurement is of reading, piecing and writing) and reports the
subprocess's peak RSS next to the input size, and, as the baseline, the peak
RSS of reading the same file whole with pyarrow (what the backfill did
before it streamed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any



def _peak_rss_mib() -> float:
    """This process's own resident high-water mark (VmHWM; unlike ru_maxrss not inherited across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


class InstantEngine:
    """The engine protocol with no model: every text is "positive" at 0.9."""

    model_name = "instant"

    def classify(self, texts: list[str]) -> list[Any]:
        from nlpstream.inference.types import Prediction

        return [Prediction("positive", 0.9, {"positive": 0.9}) for _ in texts]

    classify_each = classify

    def close(self) -> None:
        pass

    def __enter__(self) -> "InstantEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def generate(folder: Path, gb: float, seed: int = 7) -> tuple[Path, Path]:
    """A JSONL and a Parquet file of about ``gb`` GB each, written in chunks (bounded memory)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    jsonl, parquet = folder / "bench.jsonl", folder / "bench.parquet"
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i:05d}{'x' * (i % 7)}" for i in range(50_000)])
    target = int(gb * 1e9)
    chunk = 200_000
    row = 0
    with open(jsonl, "w") as fh:
        while fh.tell() < target:
            words = vocab[rng.integers(0, len(vocab), size=(chunk, 28))]
            texts = [" ".join(w) for w in words]
            fh.write("".join(json.dumps({"id": f"r{row + i}", "text": t}) + "\n" for i, t in enumerate(texts)))
            row += chunk
    writer = None
    written = 0
    try:
        while written < row:
            words = vocab[rng.integers(0, len(vocab), size=(chunk, 28))]
            table = pa.table({"id": [f"r{written + i}" for i in range(chunk)], "text": [" ".join(w) for w in words]})
            if writer is None:
                writer = pq.ParquetWriter(parquet, table.schema, compression="none")
            writer.write_table(table, row_group_size=100_000)
            written += chunk
    finally:
        if writer is not None:
            writer.close()
    return jsonl, parquet


def _child(mode: str, path: str, out: str, executor: str) -> None:
    """Runs in the measured subprocess: prints one JSON line."""
    started = time.monotonic()
    if mode == "whole":
        import pyarrow.json as pajson
        import pyarrow.parquet as pq

        table = pq.read_table(path) if path.endswith(".parquet") else pajson.read_json(path)
        result: dict[str, Any] = {"rows": table.num_rows}
    else:
        from nlpstream.jobs.backfill import run_backfill
        from nlpstream.jobs.config import BackfillConfig, load_config

        cfg = load_config(BackfillConfig, None, {"output.output": out, "output.include_text": False})
        summary = run_backfill(cfg, [path], InstantEngine())
        result = {"rows": summary.rows, "files": len(summary.files), "rows_per_s": round(summary.rate)}
    result["seconds"] = round(time.monotonic() - started, 1)
    result["peak_rss_mib"] = round(_peak_rss_mib())
    print(json.dumps(result))


def measure(mode: str, path: Path, out: Path, executor: str = "local") -> dict[str, Any]:
    """Run one mode in a fresh subprocess; its result (with its own peak RSS, MiB) and the input size (MiB)."""
    import tempfile

    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "nlpstream.jobs.backfill_bench", "--child", mode, str(path),
                                 str(out), executor], stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        stdout = proc.stdout.read().decode()
        proc.wait()
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{mode} {path} failed: {err.read().decode()[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(mode=mode, input=path.name, input_mib=round(path.stat().st_size / 2**20))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=3.0)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/nlpstream-backfill-bench"))
    parser.add_argument("--child", nargs=4, metavar=("MODE", "PATH", "OUT", "EXECUTOR"))
    parser.add_argument("--no-baseline", action="store_true", help="Skip reading each file whole.")
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    jsonl, parquet = args.dir / "bench.jsonl", args.dir / "bench.parquet"
    if not (jsonl.exists() and parquet.exists()):
        jsonl, parquet = generate(args.dir, args.gb)
    for mode, path in [("backfill", parquet), ("backfill", jsonl)] + (
            [] if args.no_baseline else [("whole", parquet), ("whole", jsonl)]):
        out = args.dir / f"out-{path.stem}-{path.suffix[1:]}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        print(json.dumps(measure(mode, path, out)), flush=True)
    os.sync()


if __name__ == "__main__":
    main()
