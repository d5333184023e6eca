"""``label_udf`` in a local Spark session (local[1]): a struct of label and score, equal to the engine's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[1]").appName("nlpstream-test")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "1")
               .getOrCreate())
    try:
        yield session
    finally:
        session.stop()


def test_label_udf_labels_a_string_column_like_the_engine(spark, engine):
    from nlpstream.jobs.spark import label_udf

    texts = ["I love it, thank you!", "The order never arrived and support ignores me.", None, "  ",
             "What are your opening hours?"]
    df = spark.createDataFrame([(i, t) for i, t in enumerate(texts)], "id int, text string")
    label = label_udf(model="builtin:sentiment", devices="cpu", precision="fp32", cache_entries=0)
    out = df.withColumn("sentiment", label("text")).orderBy("id").collect()
    assert df.withColumn("sentiment", label("text")).schema["sentiment"].dataType.simpleString() == \
        "struct<label:string,score:float>"
    expected = {i: p for i, p in zip((0, 1, 4), engine.classify([texts[0], texts[1], texts[4]]))}
    for row in out:
        if row.id in expected:
            assert row.sentiment.label == expected[row.id].label
            assert row.sentiment.score == pytest.approx(expected[row.id].score, abs=1e-5)
        else:  # no usable text: no label
            assert row.sentiment.label is None and row.sentiment.score is None
    assert [r.sentiment.label for r in out if r.id in (0, 1)] == ["positive", "negative"]
