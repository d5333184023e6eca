"""Loading classifiers: ``builtin:sentiment`` or any Hugging Face
sequence-classification model (local directory or cached hub id).

Safety by default: only safetensors weights are read and
``trust_remote_code`` is always off; anything else is refused with
:class:`UnsafeModelError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nlpstream.inference.errors import ModelLoadError, UnsafeModelError

if TYPE_CHECKING:
    import torch

_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


@dataclass
class ModelBundle:
    """A loaded classifier: ``module(input_ids, attention_mask) -> logits``.

    ``labels[i]`` names logit column i of the (first) head; ``max_length``
    is the longest input in tokens the model accepts (special tokens
    included). A multi-head model (heads sharing one backbone) lists every
    head in ``heads`` as ``(name, labels)``; its logits are the heads'
    logits side by side, in that order.
    """

    name: str
    module: "torch.nn.Module"
    tokenizer: Any
    labels: tuple[str, ...]
    max_length: int
    heads: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def head_labels(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``(name, labels)`` of every head, first the main one (a one-head model: ``(("", labels),)``)."""
        return self.heads or (("", self.labels),)


class _HFLogits:
    """Adapts a transformers sequence-classification model to ``(ids, mask) -> logits``."""

    @staticmethod
    def wrap(model: "torch.nn.Module") -> "torch.nn.Module":
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

        return Wrapped(model)


def _check_safe_directory(path: Path) -> None:
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()
    if has_safetensors:
        return
    pickled = [name for name in _PICKLE_WEIGHTS if (path / name).exists()]
    if pickled:
        raise UnsafeModelError(
            f"{path} has only pickle-based weights ({', '.join(pickled)}); nlpstream loads safetensors only. "
            "Convert them once with transformers: model.save_pretrained(dir, safe_serialization=True)"
        )
    raise ModelLoadError(f"{path} has no model weights (*.safetensors)")


def _check_no_remote_code(config_path: Path) -> None:
    if not config_path.exists():
        raise ModelLoadError(f"{config_path.parent} has no config.json; is it a Hugging Face model directory?")
    config = json.loads(config_path.read_text())
    if config.get("auto_map"):
        raise UnsafeModelError(
            f"{config_path.parent} needs custom code (auto_map in config.json); trust_remote_code is off in nlpstream"
        )


def quiet_transformers() -> None:
    """Silence transformers' progress bars and info logs (they would flood service logs)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_hf_model(spec: str) -> ModelBundle:
    """Load a local directory or a hub id that the local cache (or network) has.

    Raises UnsafeModelError for pickle-only weights or custom code, and
    ModelLoadError for anything else that prevents loading.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    path = Path(spec).expanduser()
    source = str(path) if path.is_dir() else spec
    if path.is_dir():
        _check_safe_directory(path)
        _check_no_remote_code(path / "config.json")
    elif path.exists():
        raise ModelLoadError(f"model {spec!r} is a file; pass the model directory or 'builtin:sentiment'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForSequenceClassification.from_pretrained(
            source, trust_remote_code=False, use_safetensors=True
        )
    except (OSError, ValueError, KeyError) as exc:
        if not path.is_dir():  # a hub id: the hub's own message talks about repo ids and connections
            from nlpstream.inference.preflight import MODEL_CHOICES

            raise ModelLoadError(f"model {spec!r} is not a local directory, not in the local Hugging Face cache, "
                                 f"and could not be downloaded ({type(exc).__name__}); {MODEL_CHOICES}") from exc
        raise ModelLoadError(f"cannot load model {spec!r}: {exc}") from exc
    model.eval()
    id2label = getattr(model.config, "id2label", None) or {}
    labels = tuple(str(id2label.get(i, f"LABEL_{i}")) for i in range(model.config.num_labels))
    limit = min(
        int(getattr(model.config, "max_position_embeddings", 512) or 512),
        int(getattr(tokenizer, "model_max_length", 512) or 512),
    )
    return ModelBundle(name=spec, module=_HFLogits.wrap(model), tokenizer=tokenizer, labels=labels, max_length=limit)


def load_model(spec: str) -> ModelBundle:
    """Load ``builtin:<name>``, a head folder written by ``nlpstream train-head``, several of those
    separated by commas (heads sharing the packaged backbone, one forward pass), or a Hugging Face
    model (see :func:`load_hf_model`)."""
    from nlpstream.inference.heads import is_head_spec, load_heads

    parts = [p.strip() for p in spec.split(",")]
    if len(parts) > 1 or is_head_spec(parts[0]):
        return load_heads(parts)
    return load_hf_model(spec)
