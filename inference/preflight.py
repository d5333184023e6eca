"""Cheap checks of a model, device and precision choice, before anything heavy is loaded.

Every command runs them first, so a mistake costs one clear line instead of
a traceback after a model load (or, for the stream job, after a wait for
Kafka). Each error says what was given and what would work.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from nlpstream.inference.errors import DeviceError, InferenceError, ModelLoadError

MODEL_CHOICES = ("give a local Hugging Face model directory (safetensors weights), 'builtin:sentiment', "
                 "a head folder written by 'nlpstream train-head', several heads separated by commas "
                 "('builtin:sentiment,builtin:topic'), or a hub id present in the local Hugging Face cache")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def check_engine_options(model: str = "builtin:sentiment", devices: str = "auto", precision: str = "auto",
                         **_: Any) -> None:
    """Raise an InferenceError subclass when ``model``, ``devices`` or ``precision`` cannot work here."""
    check_model(model)
    device_list = check_devices(devices)
    check_precision(precision, device_list)


def check_model(spec: str) -> None:
    """ModelLoadError unless ``spec`` names a builtin, an existing directory, a hub id that can be loaded,
    or several heads (builtins and ``train-head`` folders) separated by commas."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) > 1:
        for part in parts:
            if not part:
                raise ModelLoadError(f"model {spec!r} has an empty part between commas")
            if part.startswith("builtin:"):
                check_model(part)
            elif not (Path(part).expanduser() / "head.json").is_file():
                raise ModelLoadError(
                    f"{part!r} in --model {spec!r} is not a head: several models separated by commas must each be "
                    "'builtin:<name>' or a folder written by 'nlpstream train-head' (with head.json)")
        return
    if spec.startswith("builtin:"):
        from nlpstream.inference.builtin import BUILTINS

        name = spec.split(":", 1)[1]
        if name not in BUILTINS:
            raise ModelLoadError(f"unknown builtin model {spec!r}; available: "
                                 + ", ".join(f"builtin:{b}" for b in BUILTINS))
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ModelLoadError(f"model {spec!r} is a file, not a model directory; {MODEL_CHOICES}")
    if _looks_like_path(spec) or not _HUB_ID.match(spec):
        raise ModelLoadError(f"model {spec!r} not found: no such directory; {MODEL_CHOICES}")
    if in_hub_cache(spec):
        return
    if hub_offline():
        raise ModelLoadError(f"model {spec!r} is not in the local Hugging Face cache "
                             f"({hub_cache_dir()}) and downloads are off (HF_HUB_OFFLINE=1); {MODEL_CHOICES}")
    try:  # downloads allowed: ask the hub once, briefly, before anything waits for Kafka
        from huggingface_hub import HfApi

        HfApi().model_info(spec, timeout=10)
    except Exception as exc:  # noqa: BLE001 - not found, gated, no network: it cannot be loaded now
        raise ModelLoadError(f"model {spec!r} is not in the local Hugging Face cache ({hub_cache_dir()}) and "
                             f"the hub did not serve it ({type(exc).__name__}); {MODEL_CHOICES}") from None


def check_devices(spec: str) -> list[str]:
    """The device list of ``spec``; DeviceError (with the choices that would work) when it cannot be used."""
    from nlpstream.inference.devices import parse_devices

    try:
        return parse_devices(spec)
    except DeviceError as exc:
        raise DeviceError(f"{exc}; use --devices auto, cpu or cpu:N here{_visible_gpus()}") from None


def check_precision(precision: str, devices: list[str]) -> None:
    """InferenceError when ``precision`` cannot run on one of ``devices``."""
    from nlpstream.inference import openvino_backend as ovb
    import torch

    from nlpstream.inference.engine import cuda_capability, precision_mode

    has_ov = any(d.startswith("cpu") for d in devices) and ovb.available()
    for dev in dict.fromkeys(devices):
        capability = cuda_capability(torch.device(dev)) if dev.startswith("cuda") else None
        precision_mode(precision, dev, has_ov, has_ov and ovb.available(int8=True), capability)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1


def _visible_gpus() -> str:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f" (or cuda, cuda:0..cuda:{n - 1}: {n} GPU(s) visible)" if n else ""


def hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def in_hub_cache(repo_id: str) -> bool:
    """True when the local hub cache has a config.json of ``repo_id`` (a model the loader can find offline)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


__all__ = ["check_engine_options", "check_model", "check_devices", "check_precision", "InferenceError"]
