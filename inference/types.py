"""Plain results of the inference engine."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Prediction:
    """The label of one text: ``label`` is the argmax of ``probs``, ``score`` its probability.

    ``heads`` holds the result of every further head of a multi-head model
    (``--model builtin:sentiment,DIR``), by head name, in model order.
    """

    label: str
    score: float
    probs: dict[str, float] = field(default_factory=dict)
    heads: dict[str, "Prediction"] = field(default_factory=dict)
