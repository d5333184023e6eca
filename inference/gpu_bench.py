"""``nlpstream bench --devices cuda``: steady-state device throughput that measures what it says.

For each prefix of the device list (1, 2, ... N GPUs) one engine classifies
a warm-up corpus (not timed) and then the measured corpus (100,000 distinct
texts by default). Reported apart:

- *end-to-end*: wall time of ``Engine.classify`` (tokenization, padding,
  scheduling, device work, results);
- *device*: seconds the busiest replica spent inside its runner (copy in,
  forward, softmax, copy back) on successful batches;
- padding share (padded positions that are padding), per-GPU rate, scaling
  efficiency ``rate(k) / (k * rate(1))``;
- share of the dense bf16 (fp16 before Ampere) peak, from a table looked up
  by the exact device name (``--peak-tflops`` overrides; unknown names get
  no share rather than a guessed one);
- label agreement with fp32 on the first ``agreement_texts`` texts.

The same code runs on CPU replicas (``cpu:2``), which is how it is tested.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from nlpstream.inference import load_engine
from nlpstream.inference.bench import _flops_per_token, make_corpus

# Dense (no sparsity) tensor-core peaks in TFLOP/s, bf16 where the chip has it natively, else fp16,
# keyed by the exact name torch.cuda.get_device_name reports (vendor data sheets).
DENSE_PEAK_TFLOPS: dict[str, float] = {
    "NVIDIA H200": 989.0,
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA L40": 181.0,
    "NVIDIA L4": 121.0,
    "NVIDIA A10G": 70.0,
    "NVIDIA A10": 125.0,
    "Tesla T4": 65.0,  # fp16
    "Tesla V100-SXM2-16GB": 125.0,  # fp16
    "Tesla V100-SXM2-32GB": 125.0,  # fp16
}


def lookup_peak(name: str) -> float | None:
    """Dense peak TFLOP/s for a device name, matched exactly (an L40 is not an L4); None when unknown."""
    return DENSE_PEAK_TFLOPS.get(name.strip())


def scaling_efficiency(rates: dict[int, float]) -> dict[int, float]:
    """``rate(k) / (k * rate(1))`` for each device count k (1.0 = linear)."""
    one = rates.get(1)
    if not one:
        return {}
    return {k: round(r / (k * one), 3) for k, r in sorted(rates.items())}


def _model_config(engine: Any) -> Any | None:
    module = engine.bundle.module
    for attr in ("backbone", "inner"):
        inner = getattr(module, attr, None)
        if inner is not None and hasattr(inner, "config"):
            return inner.config
    return getattr(module, "config", None)


def _device_name(device: str) -> tuple[str, str | None]:
    if not device.startswith("cuda"):
        return "cpu", None
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def run_device_bench(model: str, devices: list[str], n_texts: int = 100_000, warmup: int = 10_000,
                     precision: str = "auto", agreement_texts: int = 5_000, peak_tflops: float | None = None,
                     echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure 1..len(devices) replicas of ``model``; see the module docstring for what is reported."""
    texts = make_corpus(n_texts, seed=0)
    warm = make_corpus(max(1, warmup), seed=1)
    name, capability = _device_name(devices[0])
    peak = peak_tflops if peak_tflops is not None else lookup_peak(name)
    result: dict[str, Any] = {"device": name, "compute_capability": capability, "model": model, "texts": n_texts,
                              "warmup_texts": warmup, "precision": precision, "peak_tflops": peak, "runs": []}
    echo(f"device {name} (compute capability {capability}); peak {peak or 'unknown'} TFLOP/s; model {model}; "
         f"{n_texts} texts after {warmup} warm-up texts")
    labels_one: list[str] = []
    rates: dict[int, float] = {}
    for k in range(1, len(devices) + 1):
        with load_engine(model, ",".join(devices[:k]), precision, cache_entries=0) as engine:
            engine.classify(warm)
            _sync(devices[:k])
            for r in engine._replicas:
                r.busy_s, r.padded_tokens, r.real_tokens = 0.0, 0, 0
            start = time.perf_counter()
            preds = engine.classify(texts)
            _sync(devices[:k])
            e2e = time.perf_counter() - start
            device_s = max(r.busy_s for r in engine._replicas) or e2e
            padded = sum(r.padded_tokens for r in engine._replicas)
            real = sum(r.real_tokens for r in engine._replicas)
            run: dict[str, Any] = {
                "devices": k, "modes": engine.modes, "end_to_end_s": round(e2e, 3), "device_s": round(device_s, 3),
                "texts_per_s": round(n_texts / e2e, 1), "texts_per_s_per_device": round(n_texts / e2e / k, 1),
                "device_texts_per_s": round(n_texts / device_s, 1), "tokens_per_s": round(real / e2e, 1),
                "padding_share": round(1 - real / padded, 4) if padded else 0.0,
                "device_busy_share": round(sum(r.busy_s for r in engine._replicas) / (k * e2e), 4),
            }
            config = _model_config(engine)
            if peak and config is not None:
                flops = _flops_per_token(config, real / n_texts) * real
                run["share_of_peak_end_to_end"] = round(flops / e2e / (peak * 1e12 * k), 4)
                run["share_of_peak_device"] = round(flops / device_s / (peak * 1e12 * k), 4)
            rates[k] = n_texts / e2e
            if k == 1:
                labels_one = [p.label for p in preds[:agreement_texts]]
            result["runs"].append(run)
            echo(f"  {k} device(s): {run['texts_per_s']:>10.1f} texts/s end-to-end ({run['texts_per_s_per_device']:.1f}"
                 f" per device), device-only {run['device_texts_per_s']:.1f} texts/s, padding {run['padding_share']:.1%}"
                 f", busy {run['device_busy_share']:.1%}")
    result["scaling_efficiency"] = scaling_efficiency(rates)
    with load_engine(model, devices[0], "fp32", cache_entries=0) as ref:
        reference = [p.label for p in ref.classify(texts[:agreement_texts])]
    result["agreement_vs_fp32"] = round(sum(a == b for a, b in zip(labels_one, reference)) / len(reference), 4)
    echo(f"  scaling efficiency {result['scaling_efficiency']}; agreement with fp32 "
         f"{result['agreement_vs_fp32']:.4f} on {len(reference)} texts")
    return result


def _sync(devices: list[str]) -> None:
    if any(d.startswith("cuda") for d in devices):
        import torch

        for d in devices:
            torch.cuda.synchronize(d)


def main(argv: list[str] | None = None) -> None:
    """``python -m nlpstream.inference.gpu_bench``: the same bench without the CLI's dependencies (for bare GPU hosts)."""
    import argparse
    import json

    from nlpstream.inference.devices import parse_devices

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:sentiment")
    parser.add_argument("--devices", default="cuda")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--texts", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=10_000)
    parser.add_argument("--agreement-texts", type=int, default=5_000)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    result = run_device_bench(args.model, parse_devices(args.devices), args.texts, args.warmup, args.precision,
                              args.agreement_texts, args.peak_tflops)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
