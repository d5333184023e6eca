"""``nlpstream bench``: the engine against ``transformers.pipeline`` on one corpus, side by side.

The corpus mixes lengths like real streams (mostly short chats and headlines,
a long tail of multi-sentence tickets up to the model's limit). Every
contender runs in the same process on the same texts and the same backbone;
results are throughput ratios against the baseline measured in this run.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from inference import load_engine


def make_corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` texts built from the shipped sentences: 70% one sentence, 25% 2-4, 5% 6-20."""
    path = resources.files("inference.builtin").joinpath("data/sentiment_train.jsonl")
    sentences = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    corpus = []
    for _ in range(n):
        roll = rng.random()
        k = 1 if roll < 0.70 else rng.randint(2, 4) if roll < 0.95 else rng.randint(6, 20)
        corpus.append(" ".join(rng.choice(sentences) for _ in range(k)))
    return corpus


def _time(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _pipeline_baseline(engine: Any, texts: list[str], batch_size: int) -> tuple[float, list[str]]:
    """transformers.pipeline on the same backbone (a BertForSequenceClassification sharing its weights)."""
    import torch
    from transformers import BertForSequenceClassification, pipeline

    backbone = engine.bundle.module.backbone
    clf = BertForSequenceClassification(backbone.config)
    clf.bert.load_state_dict(backbone.state_dict(), strict=False)
    clf.eval()
    pipe = pipeline("text-classification", model=clf, tokenizer=engine.bundle.tokenizer, device=-1,
                    truncation=True, max_length=engine.max_length)
    with torch.inference_mode():
        pipe(texts[:4], batch_size=batch_size)  # warm-up
        seconds, out = _time(lambda: pipe(texts, batch_size=batch_size))
    return seconds, [o["label"] for o in out]


def run_bench(n_texts: int = 2000, model: str = "builtin:sentiment", devices: str = "auto",
              include_pipeline: bool = True, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the comparison and return (and echo) texts/s, tokens/s and ratios."""
    texts = make_corpus(n_texts)
    results: dict[str, Any] = {"texts": n_texts, "model": model, "devices": devices, "runs": {}}
    with load_engine(model, devices, "fp32") as engine:
        tokens = sum(len(x) for x in engine.tokenize(texts))
        results["tokens"] = tokens
        results["mean_tokens"] = round(tokens / n_texts, 1)
        engine.classify(texts[:64])  # warm-up
        seconds, preds = _time(lambda: engine.classify(texts))
        results["runs"]["engine_fp32"] = {"seconds": seconds}
        if include_pipeline and model.startswith("builtin:"):
            pipe_texts = texts[: max(64, n_texts // 4)]  # the baseline is slow; rates are per text
            for bs in (1, 32):
                sec, _ = _pipeline_baseline(engine, pipe_texts, bs)
                pipe_tokens = sum(len(x) for x in engine.tokenize(pipe_texts))
                results["runs"][f"pipeline_batch{bs}"] = {"seconds": sec, "texts": len(pipe_texts), "tokens": pipe_tokens}
    for name, run in results["runs"].items():
        n = run.get("texts", n_texts)
        tok = run.get("tokens", tokens)
        run["texts_per_s"] = round(n / run["seconds"], 1)
        run["tokens_per_s"] = round(tok / run["seconds"], 1)
    base = [r["texts_per_s"] for k, r in results["runs"].items() if k.startswith("pipeline")]
    if base:
        results["engine_vs_best_pipeline"] = round(results["runs"]["engine_fp32"]["texts_per_s"] / max(base), 2)
    echo(f"corpus: {n_texts} texts, mean {results['mean_tokens']} tokens; model {model}; devices {devices}")
    for name, run in results["runs"].items():
        echo(f"  {name:<18} {run['texts_per_s']:>10.1f} texts/s {run['tokens_per_s']:>12.1f} tokens/s")
    if "engine_vs_best_pipeline" in results:
        echo(f"  engine / best transformers.pipeline = {results['engine_vs_best_pipeline']}x")
    return results
