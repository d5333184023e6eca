"""Model loading, batching and device execution for nlpstream.

Knows nothing of Kafka or sinks. The stable entry point is
:func:`load_engine`; an :class:`Engine` labels texts with
:class:`Prediction` results.
"""

from __future__ import annotations

from typing import Any

from nlpstream.inference.errors import (
    AgreementError,
    DeviceError,
    InferenceError,
    ModelLoadError,
    NoLiveDeviceError,
    TextError,
    UnsafeModelError,
)
from nlpstream.inference.types import Prediction

__all__ = [
    "AgreementError",
    "DeviceError",
    "Engine",
    "InferenceError",
    "ModelLoadError",
    "NoLiveDeviceError",
    "Prediction",
    "TextError",
    "UnsafeModelError",
    "load_engine",
]


def load_engine(
    model: str = "builtin:sentiment",
    devices: str = "auto",
    precision: str = "auto",
    max_batch_tokens: int | None = None,
    max_batch_size: int | None = None,
    long_text: str = "truncate",
    **options: Any,
) -> "Engine":
    """Load ``model`` onto ``devices`` and return a ready :class:`Engine`.

    ``model``: ``builtin:sentiment``, a local Hugging Face
    sequence-classification directory (safetensors only) or a cached hub id.
    ``devices``: ``auto``, ``cpu``, ``cpu:N``, ``cuda``, ``cuda:0,cuda:1``.
    ``precision``: ``auto``, ``fp32``, ``bf16``, ``fp16`` or ``int8``.
    ``max_batch_tokens`` / ``max_batch_size``: per device batch limits
    (default 2048 / 32 on CPU, 65536 / 1024 on GPU).
    ``long_text``: ``truncate`` or ``chunk``. ``options``: ``cache_entries``,
    ``cache_bytes``, ``target_latency_ms``, ``max_batch_delay_ms``,
    ``chunk_overlap``, ``min_agreement``, ``agreement_sample``,
    ``probe_backoff_s``, ``attempt_timeout_s`` (see :class:`Engine`).
    Raises ModelLoadError / UnsafeModelError / DeviceError / InferenceError.
    """
    from nlpstream.inference.devices import parse_devices
    from nlpstream.inference.engine import Engine
    from nlpstream.inference.model import load_model

    device_list = parse_devices(devices)
    bundle = load_model(model)
    return Engine(bundle, device_list, precision, max_batch_tokens, max_batch_size, long_text, **options)


def __getattr__(name: str) -> object:
    if name == "Engine":
        from nlpstream.inference.engine import Engine

        return Engine
    raise AttributeError(name)
