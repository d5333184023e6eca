"""Export a classifier to OpenVINO once, quantize it to int8 with NNCF, cache both.

Cache: ``$NLPSTREAM_CACHE_DIR/compiled/<key>/{fp32,int8}.xml`` (default
``~/.cache/nlpstream``), where the key hashes the weights, the precision and
the OpenVINO/NNCF versions, so a changed model or library never reuses a
stale graph. Calibration uses the English sentences shipped with the
builtin model, cut into length-sorted batches like live traffic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nlpstream.inference.batching import plan_batches
from nlpstream.inference.errors import InferenceError
from nlpstream.inference.model import ModelBundle

log = logging.getLogger(__name__)
# int8 top-two margin (per head, in calibrated probabilities) under which a text is rerun in bf16: measured
# on 960 shipped texts with two heads, 0.03 kept 98.3-98.6% of fp32 labels (3.4% reruns), 0.06 keeps 99.2-99.4%
# (6.2% reruns), 0.1 99.4-99.7% (9.5%)
GUARD_MARGIN = 0.06
_CALIBRATION_TEXTS = 300
RUNTIME_CACHE_CAPACITY = 256


def available(int8: bool = False) -> bool:
    """Whether OpenVINO (and NNCF for int8) can be imported."""
    try:
        import openvino  # noqa: F401

        if int8:
            import nncf  # noqa: F401
    except ImportError:
        return False
    return True


def cache_dir() -> Path:
    root = Path(os.environ.get("NLPSTREAM_CACHE_DIR", Path.home() / ".cache" / "nlpstream"))
    return root / "compiled"


def weights_key(module: torch.nn.Module, extra: str) -> str:
    """A hash of every parameter and buffer plus ``extra`` (versions, precision)."""
    digest = hashlib.sha256(extra.encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def calibration_batches(bundle: ModelBundle, count: int = _CALIBRATION_TEXTS) -> list[dict[str, np.ndarray]]:
    """Padded batches of shipped sentences (single and joined, like tickets and headlines); the plain
    length cut, as when the cached int8 models were calibrated."""
    path = resources.files("nlpstream.inference.builtin").joinpath("data/sentiment_train.jsonl")
    sentences = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(sentences) for _ in range(rng.choice((1, 1, 1, 2, 3, 6)))) for _ in range(count)]
    ids = bundle.tokenizer(texts, truncation=True, max_length=bundle.max_length)["input_ids"]
    batches = []
    for batch in plan_batches([len(x) for x in ids], 2048, 32, pad_tolerance=None):
        a = np.full((len(batch.indices), batch.padded_length), bundle.tokenizer.pad_token_id or 0, dtype=np.int64)
        m = np.zeros_like(a)
        for row, i in enumerate(batch.indices):
            a[row, : len(ids[i])] = ids[i]
            m[row, : len(ids[i])] = 1
        batches.append({"input_ids": a, "attention_mask": m})
    return batches


def _save_atomic(model: Any, target: Path) -> None:
    """Save IR under a per-process temporary name, then rename (.bin first, .xml last):
    concurrent processes never read a half-written graph."""
    import openvino as ov

    tmp = target.with_name(f".{target.stem}.{os.getpid()}.xml")
    ov.save_model(model, str(tmp), compress_to_fp16=False)
    tmp.with_suffix(".bin").replace(target.with_suffix(".bin"))
    tmp.replace(target)


def _export(bundle: ModelBundle, target: Path) -> Any:
    import openvino as ov

    example = {"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about branches that are constant for classifiers
        model = ov.convert_model(bundle.module, example_input=example)
    _save_atomic(model, target)
    return model


def load_models(bundle: ModelBundle, int8: bool) -> tuple[Any, Any | None]:
    """(fp32 model, int8 model or None), exported and quantized once, then read from the cache.

    Raises InferenceError when OpenVINO/NNCF are missing or export fails.
    """
    try:
        import openvino as ov
    except ImportError as exc:
        raise InferenceError("precision bf16/int8 on CPU needs the 'openvino' package") from exc
    versions = f"ov={ov.__version__}"
    if int8:
        try:
            import nncf
        except ImportError as exc:
            raise InferenceError("precision int8 on CPU needs the 'nncf' package") from exc
        versions += f";nncf={nncf.__version__}"
    folder = cache_dir() / weights_key(bundle.module, versions + ";calib=v1")
    folder.mkdir(parents=True, exist_ok=True)
    core = ov.Core()
    fp32_path = folder / "fp32.xml"
    try:
        fp32 = core.read_model(str(fp32_path)) if fp32_path.exists() else _export(bundle, fp32_path)
        if not int8:
            return fp32, None
        int8_path = folder / "int8.xml"
        if int8_path.exists():
            return fp32, core.read_model(str(int8_path))
        log.info("quantizing %s to int8 once (cached in %s)", bundle.name, folder)
        calibration = calibration_batches(bundle)
        nncf_log = logging.getLogger("nncf")
        level = nncf_log.level
        nncf_log.setLevel(logging.ERROR)
        try:
            quantized = nncf.quantize(fp32, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=len(calibration))
        finally:
            nncf_log.setLevel(level)
        _save_atomic(quantized, int8_path)
        return fp32, quantized
    except (RuntimeError, ValueError, OSError) as exc:
        raise InferenceError(f"OpenVINO export of {bundle.name} failed: {exc}") from exc


def compile_cpu(model: Any, hint: str, latency: bool = False) -> Any:
    """Compile for CPU with the given inference precision (bf16 or f32), in throughput
    mode (one stream per core group, for the main pass) or latency mode (all cores on
    one request, for the guard's reruns)."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY" if latency else "THROUGHPUT",
              # shape-specific kernels are cached per (batch, length); the default 5000 entries
              # let resident memory climb by ~0.5 GB over 50k texts, 256 keeps it nearly flat
              "CPU_RUNTIME_CACHE_CAPACITY": str(RUNTIME_CACHE_CAPACITY)}
    return ov.Core().compile_model(model, "CPU", config)
