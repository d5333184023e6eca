"""Spark: label a string column with the engine inside Spark jobs.

    from nlpstream.jobs.spark import label_udf
    label = label_udf(model="builtin:sentiment", devices="cpu")
    df = df.withColumn("sentiment", label("text"))   # struct<label: string, score: float>

The engine is loaded once per executor Python process (Spark reuses its
Python workers by default, ``spark.python.worker.reuse``), on the first
batch, and kept for the life of that process: the one process-wide cache of
this module. A null, non-string or blank text, and a text the model fails
on alone, gets a null struct field pair (label and score null).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import pandas as pd  # module level: Spark reads the UDF's type hints (pd.Series -> pd.DataFrame) from here

SCHEMA_DDL = "label string, score float"


@functools.lru_cache(maxsize=4)
def _engine(options_json: str) -> Any:
    """The engine of these options in this process (loaded on first use, then reused)."""
    from nlpstream.inference import load_engine

    return load_engine(**json.loads(options_json))


def label_texts(options_json: str, texts: list[Any]) -> tuple[list[str | None], list[float | None]]:
    """Labels and scores of ``texts`` (None for unusable texts and texts the model fails on alone)."""
    engine = _engine(options_json)
    usable = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    labels: list[str | None] = [None] * len(texts)
    scores: list[float | None] = [None] * len(texts)
    if usable:
        each = getattr(engine, "classify_each", None)
        batch = [texts[i] for i in usable]
        results = each(batch) if each is not None else engine.classify(batch)
        for i, p in zip(usable, results):
            if not isinstance(p, BaseException):
                labels[i], scores[i] = p.label, float(p.score)
    return labels, scores


def label_udf(model: str = "builtin:sentiment", devices: str = "auto", precision: str = "auto",
              **engine_options: Any) -> Any:
    """A pandas UDF: a string column -> ``struct<label: string, score: float>``.

    ``engine_options`` go to :func:`inference.load_engine` as well
    (``max_batch_size``, ``cache_entries``, ...); the options are checked
    when the engine loads on an executor. Needs pyspark, pandas and pyarrow
    (``pip install 'nlpstream[spark]'``).
    """
    from pyspark.sql.functions import pandas_udf

    options_json = json.dumps({"model": model, "devices": devices, "precision": precision, **engine_options},
                              sort_keys=True)

    @pandas_udf(SCHEMA_DDL)  # type: ignore[call-overload]
    def label(texts: pd.Series) -> pd.DataFrame:
        labels, scores = label_texts(options_json, texts.tolist())
        return pd.DataFrame({"label": pd.Series(labels, dtype="object"),
                             "score": pd.Series(scores, dtype="float32")})

    return label
