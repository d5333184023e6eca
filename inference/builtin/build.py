"""Rebuild the builtin heads from the packaged backbone and the shipped data.

    python -m nlpstream.inference.builtin.build [--seed 13] [--out DIR] [--only sentiment|topic]

Deterministic for a given seed on a given machine: sentence embeddings from
the frozen MiniLM-L6 backbone (mean pooling, L2 norm, single-threaded), then
a multinomial logistic-regression head fitted with full-batch L-BFGS and L2
weight decay, then one temperature fitted on 5-fold out-of-fold logits of the
training rows (see :mod:`nlpstream.inference.heads`). Writes
``<name>.safetensors`` (the raw head) and ``<name>.json`` (labels,
temperature, sha256 of the head, the backbone, held-out figures) into
``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from nlpstream.inference.builtin import BUILTIN_DIR
from nlpstream.inference.heads import (
    FittedHead,
    backbone_identity,
    embed_texts,
    evaluate,
    fit_calibrated,
    head_spec,
    save_weights,
)

LABELS = ("negative", "neutral", "positive")
TOPIC_LABELS = ("billing", "delivery", "technical", "account", "product", "other")
DATA_DIR = BUILTIN_DIR / "data"
SEED_FEW_SHOT = 100  # rows of the few-shot check: a head trained from this many labeled examples


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _by_domain(fitted: FittedHead, x: torch.Tensor, rows: list[dict[str, Any]]) -> dict[str, float]:
    with torch.no_grad():
        pred = (x @ fitted.weight.T + fitted.bias).argmax(dim=1).tolist()
    domains: dict[str, list[bool]] = {}
    for r, p in zip(rows, pred):
        domains.setdefault(r["domain"], []).append(fitted.labels[p] == r["label"])
    return {d: round(sum(v) / len(v), 4) for d, v in sorted(domains.items())}


def _eval(fitted: FittedHead, rows: list[dict[str, Any]]) -> dict[str, Any]:
    x = embed_texts([r["text"] for r in rows])
    y = torch.tensor([fitted.labels.index(r["label"]) for r in rows])
    result = evaluate(fitted, x, y)
    result["accuracy_by_domain"] = _by_domain(fitted, x, rows)
    return result


def build_head(name: str, labels: tuple[str, ...], seed: int, out: Path, data_dir: Path = DATA_DIR,
               independent: str | None = None, few_shot: bool = False) -> dict[str, Any]:
    """Train ``<name>`` from ``<name>_train.jsonl``, report on ``<name>_heldout.jsonl``; write the artifacts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-for-bit reproducible reductions
    try:
        train = read_jsonl(data_dir / f"{name}_train.jsonl")
        heldout = read_jsonl(data_dir / f"{name}_heldout.jsonl")
        x_train = embed_texts([r["text"] for r in train])
        y_train = torch.tensor([labels.index(r["label"]) for r in train])
        fitted = fit_calibrated(x_train, y_train, labels, seed)
        extra: dict[str, Any] = {}
        if independent and (data_dir / independent).exists():
            extra["independent"] = _eval(fitted, read_jsonl(data_dir / independent))
        if few_shot:  # a head from SEED_FEW_SHOT labeled rows (a seeded, label-stratified sample), same held-out set
            gen = torch.Generator().manual_seed(seed)
            picks = []
            for k in range(len(labels)):
                per_label = SEED_FEW_SHOT // len(labels) + (k < SEED_FEW_SHOT % len(labels))
                rows = (y_train == k).nonzero().flatten()
                picks += rows[torch.randperm(len(rows), generator=gen)[:per_label]].tolist()
            small = fit_calibrated(x_train[picks], y_train[picks], labels, seed)
            extra["few_shot"] = {"train_size": len(picks), "heldout": _eval(small, heldout)}
        train_accuracy = evaluate(fitted, x_train, y_train)["accuracy"]
        held = _eval(fitted, heldout)
    finally:
        torch.set_num_threads(threads)
    blob = save_weights(fitted)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.safetensors").write_bytes(blob)
    spec = head_spec(name, fitted, backbone_identity(), blob, head_file=f"{name}.safetensors", max_length=256,
                     seed=seed, weight_decay=1e-3, folds=5, train_size=len(train), train_accuracy=train_accuracy,
                     heldout=held, **extra)
    (out / f"{name}.json").write_text(json.dumps(spec, indent=2) + "\n")
    return spec


def build(seed: int, out: Path, data_dir: Path = DATA_DIR) -> dict[str, Any]:
    """Build ``builtin:sentiment``; returns the spec written."""
    return build_head("sentiment", LABELS, seed, out, data_dir, independent="sentiment_independent.jsonl")


def build_topic(seed: int, out: Path, data_dir: Path = DATA_DIR) -> dict[str, Any]:
    """Build ``builtin:topic`` (customer-service topic); returns the spec written."""
    return build_head("topic", TOPIC_LABELS, seed, out, data_dir, few_shot=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", type=Path, default=BUILTIN_DIR)
    parser.add_argument("--only", choices=("sentiment", "topic"))
    args = parser.parse_args()
    keys = ("head_sha256", "temperature", "train_accuracy", "heldout", "independent", "few_shot")
    if args.only in (None, "sentiment"):
        spec = build(args.seed, args.out)
        print(json.dumps({k: spec[k] for k in keys if k in spec}, indent=2))
    if args.only in (None, "topic"):
        spec = build_topic(args.seed, args.out)
        print(json.dumps({k: spec[k] for k in keys if k in spec}, indent=2))


if __name__ == "__main__":
    main()
