"""``nlpstream bench --pipeline`` end to end on the test broker, small sizes (figures are for the bench, not asserted)."""

from __future__ import annotations

import pytest

from nlpstream.jobs.pipeline_bench import run_pipeline_bench

pytestmark = [pytest.mark.kafka, pytest.mark.model]


def test_pipeline_bench_reports_every_figure(kafka_bootstrap):
    out = run_pipeline_bench(kafka_bootstrap, messages=3000, partitions=3, model_messages=120, rounds=1, processes=2, echo=print)
    for key in ("bare_confluent_consumer_msgs_per_s", "job_instant_engine_msgs_per_s",
                "job_instant_engine_confluent_client_msgs_per_s", "simulated_device_texts_per_s",
                "engine_instant_runner_texts_per_s", "engine_instant_runner_cpu_limits_texts_per_s", "tokenizer_texts_per_s", "model_engine_alone_texts_per_s",
                "model_job_msgs_per_s", "decode_json_records_per_s", "decode_avro_records_per_s",
                "decode_json_schema_records_per_s", "decode_protobuf_records_per_s",
                "decode_json_columns_records_per_s", "job_instant_confluent_processes_msgs_per_s"):
        assert out[key] > 0, key
    assert out["job_instant_confluent_processes"] == 2
    assert out["job_instant_confluent_processes_rows_written"] == 3000  # the two processes wrote each message once
    for key in ("simulated_device_busy_share", "simulated_device_busy_share_unpipelined",
                "simulated_device_busy_share_flush_on_loop"):
        assert 0 < out[key] <= 1.05, key
    assert out["simulated_device_texts_per_s"] == pytest.approx(0.6 * out["job_instant_engine_msgs_per_s"], rel=0.01)
    # ratios are rounded to 3 decimals: a small one (a tiny topic's rates swing widely) is off by up to 5e-4, and the rates are rounded too
    rounded = {"rel": 0.01, "abs": 1e-3}
    assert 0 < out["job_instant_vs_bare_consumer"] == pytest.approx(
        out["job_instant_engine_msgs_per_s"] / out["bare_confluent_consumer_msgs_per_s"], **rounded)
    assert 0 < out["job_instant_confluent_vs_kafka_python_client"] == pytest.approx(
        out["job_instant_engine_confluent_client_msgs_per_s"] / out["job_instant_engine_msgs_per_s"], **rounded)
    for fmt in ("avro", "json_schema", "protobuf", "json_columns"):
        assert out[f"decode_{fmt}_vs_json"] == pytest.approx(
            out[f"decode_{fmt}_records_per_s"] / out["decode_json_records_per_s"], **rounded)
