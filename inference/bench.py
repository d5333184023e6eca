"""``nlpstream bench``: the engine against common ways to serve the same model, in one run.

CPU contenders, all on the same mixed-length corpus and the same backbone:
``transformers.pipeline`` (batch 1 and 32), ONNX Runtime with dynamic int8
and OpenVINO bf16 (throughput mode, asynchronous requests), both given the
engine's own length-sorted, pre-padded batches (their tokenization and
padding are not timed; the engine's are), the engine in fp32 (the reference
for label agreement) and the engine with ``precision=auto``. Results are
texts/s, tokens/s, ratios against the baselines measured in the same run and
label agreement with the engine's fp32 path. ``--devices cuda`` runs
:mod:`inference.gpu_bench` (steady state, device and end-to-end time apart,
scaling over 1..N GPUs, share of peak, agreement with fp32).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import numpy as np

from nlpstream.inference import load_engine
from nlpstream.inference.batching import plan_batches

_NAMES = ["Ana", "Bo", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kim", "Lea", "Mo", "Nia"]
_TAILS = ["Order {n}.", "Ticket #{n}.", "Ref {n}, sent from my phone.", "(account {n})", "Thanks, {name}.",
          "{name} from the {n} branch.", "Update {n}:", "cc {name}", "Case {n} still open?", ""]


def make_corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct texts from the shipped sentences: 70% one sentence, 25% 2-4, 5% 6-20,
    each with a varied reference (order numbers, names) as in real tickets and chats."""
    path = resources.files("nlpstream.inference.builtin").joinpath("data/sentiment_train.jsonl")
    sentences = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    corpus: list[str] = []
    seen: set[str] = set()
    while len(corpus) < n:
        roll = rng.random()
        k = 1 if roll < 0.70 else rng.randint(2, 4) if roll < 0.95 else rng.randint(6, 20)
        tail = rng.choice(_TAILS).format(n=rng.randint(1000, 999999), name=rng.choice(_NAMES))
        text = " ".join(rng.choice(sentences) for _ in range(k)) + (" " + tail if tail else "")
        if text not in seen:
            seen.add(text)
            corpus.append(text)
    return corpus


def _rate(name: str, seconds: float, texts: int, tokens: int, labels: list[str] | None = None,
          reference: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "seconds": round(seconds, 3), "texts": texts,
                           "texts_per_s": round(texts / seconds, 1), "tokens_per_s": round(tokens / seconds, 1)}
    if labels is not None and reference is not None:
        out["agreement_vs_fp32"] = round(sum(a == b for a, b in zip(labels, reference)) / len(labels), 4)
    return out


def _best_of(runs: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def _padded(engine: Any, texts: list[str]) -> tuple[list[tuple[tuple[int, ...], np.ndarray, np.ndarray]], int]:
    ids = engine.tokenize(texts)
    batches = plan_batches([len(x) for x in ids], engine.budget.value, engine.max_batch_size,
                           pad_tolerance=engine.pad_tolerance)  # the engine's own batches
    pad_id = engine.bundle.tokenizer.pad_token_id or 0
    out = []
    for b in batches:
        a = np.full((len(b.indices), b.padded_length), pad_id, dtype=np.int64)
        m = np.zeros_like(a)
        for row, i in enumerate(b.indices):
            a[row, : len(ids[i])] = ids[i]
            m[row, : len(ids[i])] = 1
        out.append((b.indices, a, m))
    return out, sum(len(x) for x in ids)


def _labels_from(batches: list[Any], results: list[np.ndarray], n: int, labels: tuple[str, ...]) -> list[str]:
    out = [""] * n
    for (indices, _, _), logits in zip(batches, results):
        for i, row in zip(indices, logits.argmax(-1)):
            out[i] = labels[int(row)]
    return out


def _onnx_int8(engine: Any, workdir: str) -> Any:
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path, int8_path = os.path.join(workdir, "m.onnx"), os.path.join(workdir, "m.int8.onnx")
    example = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    torch.onnx.export(engine.bundle.module, example, fp32_path, input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}, "logits": {0: "b"}})
    quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8)
    return ort.InferenceSession(int8_path, providers=["CPUExecutionProvider"])


def _openvino_bf16(engine: Any) -> Any:
    from nlpstream.inference import openvino_backend as ovb

    fp32, _ = ovb.load_models(engine.bundle, int8=False)
    return ovb.compile_cpu(fp32, "bf16")


def _run_openvino(compiled: Any, batches: list[Any]) -> list[np.ndarray]:
    import openvino as ov

    results: list[Any] = [None] * len(batches)
    jobs = ov.AsyncInferQueue(compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    jobs.set_callback(lambda req, i: results.__setitem__(i, req.get_output_tensor(0).data.copy()))
    for i, (_, a, m) in enumerate(batches):
        jobs.start_async({"input_ids": a, "attention_mask": m}, i)
    jobs.wait_all()
    return results


def _pipeline(engine: Any, texts: list[str], batch_size: int) -> float:
    import torch
    from transformers import BertForSequenceClassification, pipeline

    backbone = engine.bundle.module.backbone
    clf = BertForSequenceClassification(backbone.config)
    clf.bert.load_state_dict(backbone.state_dict(), strict=False)
    clf.eval()
    pipe = pipeline("text-classification", model=clf, tokenizer=engine.bundle.tokenizer, device=-1,
                    truncation=True, max_length=engine.max_length)
    with torch.inference_mode():
        pipe(texts[:4], batch_size=batch_size)
        start = time.perf_counter()
        pipe(texts, batch_size=batch_size)
        return time.perf_counter() - start


def run_cpu_bench(n_texts: int, model: str, baselines: bool, echo: Callable[[str], None],
                  rounds: int = 3) -> dict[str, Any]:
    """CPU comparison; each contender's best of ``rounds`` interleaved runs."""
    texts = make_corpus(n_texts)
    result: dict[str, Any] = {"device": "cpu", "texts": n_texts, "model": model, "rounds": rounds, "runs": []}
    with load_engine(model, "cpu", "fp32", cache_entries=0) as ref:
        tokens = sum(len(x) for x in ref.tokenize(texts))
        result["mean_tokens"] = round(tokens / n_texts, 1)
        result["max_tokens"] = max(len(x) for x in ref.tokenize(texts))
        ref.classify(texts[:32])
        sec, preds = _best_of(1, lambda: ref.classify(texts))
        reference = [p.label for p in preds]
        result["runs"].append(_rate("engine fp32 (reference)", sec, n_texts, tokens, reference, reference))
        if baselines and model.startswith("builtin:"):
            sub = texts[: max(64, n_texts // 5)]
            sub_tokens = sum(len(x) for x in ref.tokenize(sub))
            for bs in (1, 32):
                result["runs"].append(_rate(f"transformers.pipeline batch {bs}", _pipeline(ref, sub, bs), len(sub), sub_tokens))
    with load_engine(model, "cpu", "auto", cache_entries=0) as engine:
        contenders: dict[str, tuple[Callable[[], Any], Callable[[Any], list[str]]]] = {
            f"engine auto ({next(iter(engine.modes.values()))})":
                (lambda: engine.classify(texts), lambda out: [p.label for p in out]),
        }
        result["engine_mode"] = engine.modes
        with tempfile.TemporaryDirectory() as tmp:
            if baselines:
                batches, _ = _padded(engine, texts)
                session = _onnx_int8(engine, tmp)
                compiled = _openvino_bf16(engine)
                contenders["onnxruntime int8 (same batches)"] = (
                    lambda: [session.run(None, {"input_ids": a, "attention_mask": m})[0] for _, a, m in batches],
                    lambda out: _labels_from(batches, out, n_texts, engine.labels))
                contenders["openvino bf16 (same batches, async)"] = (
                    lambda: _run_openvino(compiled, batches), lambda out: _labels_from(batches, out, n_texts, engine.labels))
            best = {name: float("inf") for name in contenders}
            outputs: dict[str, Any] = {}
            for name, (fn, _) in contenders.items():
                fn()  # warm-up: compiled shapes, caches
            for _ in range(rounds):  # interleaved, so machine noise hits every contender alike
                for name, (fn, _) in contenders.items():
                    start = time.perf_counter()
                    outputs[name] = fn()
                    best[name] = min(best[name], time.perf_counter() - start)
            for name, (_, labels) in contenders.items():
                result["runs"].append(_rate(name, best[name], n_texts, tokens, labels(outputs[name]), reference))
    _ratios(result)
    return result


def _ratios(result: dict[str, Any]) -> None:
    runs = {r["name"]: r for r in result["runs"]}
    engine = next(r for n, r in runs.items() if n.startswith("engine auto"))
    pipe = [r["texts_per_s"] for n, r in runs.items() if n.startswith("transformers.pipeline")]
    rt = [r["texts_per_s"] for n, r in runs.items() if n.startswith(("onnxruntime", "openvino"))]
    if pipe:
        result["engine_vs_best_pipeline"] = round(engine["texts_per_s"] / max(pipe), 2)
    if rt:
        result["engine_vs_best_runtime"] = round(engine["texts_per_s"] / max(rt), 2)
    result["engine_agreement_vs_fp32"] = engine.get("agreement_vs_fp32")


def _flops_per_token(config: Any, seq: float) -> float:
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    dense = layers * (4 * h * h + 2 * h * inter)  # QKV + output projection + feed-forward, per token
    attention = layers * 2 * seq * h  # scores and weighted sum, per token
    return 2.0 * (dense + attention)


def run_memory_loop(total: int, chunk: int = 1000, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Classify ``total`` fresh texts in chunks; report resident memory along the way (MiB)."""
    import resource

    def rss_mib() -> float:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024

    samples = []
    with load_engine("builtin:sentiment", "cpu", "auto") as engine:
        done, seed = 0, 0
        while done < total:
            engine.classify(make_corpus(chunk, seed=seed))
            seed += 1
            done += chunk
            if done % max(chunk, total // 10) == 0:
                samples.append((done, round(rss_mib(), 1)))
                echo(f"  {done:>9} texts  rss {samples[-1][1]:8.1f} MiB")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"texts": total, "rss_mib": samples, "peak_mib": round(peak, 1)}


def run_bench(n_texts: int | None = None, model: str = "builtin:sentiment", devices: str = "cpu",
              include_pipeline: bool = True, echo: Callable[[str], None] = print, warmup: int = 10_000,
              precision: str = "auto", peak_tflops: float | None = None) -> dict[str, Any]:
    """Run the CPU comparison (2,000 texts by default) or the GPU bench (100,000); return and echo the results."""
    if devices.startswith("cuda"):
        from nlpstream.inference.devices import parse_devices
        from nlpstream.inference.gpu_bench import run_device_bench

        return run_device_bench(model, parse_devices(devices), n_texts or 100_000, warmup, precision,
                                peak_tflops=peak_tflops, echo=echo)
    result = run_cpu_bench(n_texts or 2000, model, include_pipeline, echo)
    echo(f"corpus: {result['texts']} distinct texts" + (f", mean {result['mean_tokens']} tokens, max {result['max_tokens']}"
                                                          if "mean_tokens" in result else "") + f"; device {result['device']}")
    for run in result["runs"]:
        line = f"  {run['name']:<44} {run['texts_per_s']:>10.1f} texts/s {run['tokens_per_s']:>12.1f} tokens/s"
        if "agreement_vs_fp32" in run:
            line += f"  agree {run['agreement_vs_fp32']:.4f}"
        echo(line)
    if "engine_vs_best_pipeline" in result:
        echo(f"  engine / best transformers.pipeline = {result['engine_vs_best_pipeline']}x")
    if "engine_vs_best_runtime" in result:
        echo(f"  engine / faster of onnxruntime int8 and openvino bf16 = {result['engine_vs_best_runtime']}x")
    return result


def run_heads_bench(n_texts: int = 2000, precision: str = "auto", devices: str = "cpu",
                    echo: Callable[[str], None] = print) -> dict[str, Any]:
    """One head against two heads sharing the backbone (builtin:sentiment vs builtin:sentiment,builtin:topic)
    on the same texts, timed in turns (best of 3 each), cache off."""
    from nlpstream.inference import load_engine

    texts = make_corpus(n_texts)
    one = load_engine("builtin:sentiment", devices, precision, cache_entries=0)
    two = load_engine("builtin:sentiment,builtin:topic", devices, precision, cache_entries=0)
    try:
        one.classify(texts[:64])  # warm both graphs
        two.classify(texts[:64])
        best = {"one head": float("inf"), "two heads": float("inf")}
        for _ in range(3):
            for name, engine in (("one head", one), ("two heads", two)):
                seconds, preds = _best_of(1, lambda e=engine: e.classify(texts))
                best[name] = min(best[name], seconds)
                if name == "one head":
                    first = [p.label for p in preds]
                else:
                    same = sum(p.label == f for p, f in zip(preds, first)) / len(texts)
    finally:
        one.close()
        two.close()
    result = {"texts": len(texts), "precision": precision, "devices": devices,
              "runs": [{"name": k, "seconds": round(v, 3), "texts_per_s": round(len(texts) / v, 1)} for k, v in best.items()],
              "two_heads_time_ratio": round(best["two heads"] / best["one head"], 3),
              "first_head_label_agreement": round(same, 4)}
    for run in result["runs"]:
        echo(f"  {run['name']:<12} {run['texts_per_s']:>10.1f} texts/s")
    echo(f"  two heads / one head time = {result['two_heads_time_ratio']}x "
         f"(first head's labels equal on {result['first_head_label_agreement']:.2%} of texts)")
    return result
