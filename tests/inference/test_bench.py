"""The benchmark runs end to end on a small corpus and reports ratios from one run."""

import pytest

from inference.bench import _flops_per_token, make_corpus, run_bench

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
