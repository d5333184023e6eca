"""The benchmark runs end to end on a small corpus and reports ratios from one run."""

import pytest

from nlpstream.inference.bench import _flops_per_token, make_corpus, run_bench

pytestmark = pytest.mark.model


def test_corpus_is_distinct_and_mixed():
    corpus = make_corpus(500)
    assert len(set(corpus)) == 500
    lengths = sorted(len(t.split()) for t in corpus)
    assert lengths[0] < 15 and lengths[-1] > 60


def test_cpu_bench_reports_every_contender(capsys):
    result = run_bench(n_texts=160, echo=print)
    names = [r["name"] for r in result["runs"]]
    assert names[0] == "engine fp32 (reference)"
    for prefix in ("transformers.pipeline batch 1", "transformers.pipeline batch 32", "engine auto",
                   "onnxruntime int8", "openvino bf16"):
        assert any(n.startswith(prefix) for n in names), prefix
    for run in result["runs"]:
        assert run["texts_per_s"] > 0 and run["tokens_per_s"] > run["texts_per_s"]
        if "agreement_vs_fp32" in run:
            assert 0.5 <= run["agreement_vs_fp32"] <= 1.0
    assert result["engine_vs_best_pipeline"] > 0 and result["engine_vs_best_runtime"] > 0
    assert result["engine_agreement_vs_fp32"] >= 0.97
    assert "engine / faster of onnxruntime int8 and openvino bf16" in capsys.readouterr().out


def test_flops_per_token_of_bert_base():
    from transformers import BertConfig

    cfg = BertConfig()  # 12 x 768, ~85M dense parameters
    assert 1.6e8 < _flops_per_token(cfg, 0) < 1.8e8


def test_device_bench_measures_steady_state_on_cpu_replicas():
    """The GPU bench's code path, on two CPU replicas: warm-up apart, device and end-to-end time, scaling."""
    from nlpstream.inference.gpu_bench import run_device_bench

    result = run_device_bench("builtin:sentiment", ["cpu", "cpu"], n_texts=300, warmup=40, precision="fp32",
                              agreement_texts=100, peak_tflops=1.0, echo=print)
    assert [r["devices"] for r in result["runs"]] == [1, 2]
    for run in result["runs"]:
        assert 0 < run["device_s"] <= run["end_to_end_s"] * run["devices"]
        assert 0 < run["padding_share"] < 0.9
        assert run["texts_per_s_per_device"] * run["devices"] == pytest.approx(run["texts_per_s"], rel=0.01)
        assert 0 < run["share_of_peak_end_to_end"] < 1
    assert set(result["scaling_efficiency"]) == {1, 2} and result["scaling_efficiency"][1] == 1.0
    assert result["agreement_vs_fp32"] == 1.0  # fp32 against fp32


def test_peak_lookup_is_exact_and_scaling_efficiency():
    from nlpstream.inference.gpu_bench import lookup_peak, scaling_efficiency

    assert lookup_peak("NVIDIA L4") == 121.0 and lookup_peak("NVIDIA L40") == 181.0
    assert lookup_peak("NVIDIA H100 PCIe") == 756.0 and lookup_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert lookup_peak("NVIDIA H100 PCIe 2") is None and lookup_peak("Some GPU") is None
    assert scaling_efficiency({1: 100.0, 2: 180.0, 4: 300.0}) == {1: 1.0, 2: 0.9, 4: 0.75}
    assert scaling_efficiency({}) == {}
