"""Plain results of the inference engine."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Prediction:
    """The label of one text: ``label`` is the argmax of ``probs``, ``score`` its probability."""

    label: str
    score: float
    probs: dict[str, float] = field(default_factory=dict)
