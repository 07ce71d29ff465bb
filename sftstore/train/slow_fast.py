"""Fine-tuning Slow and Fast (Guo et al.): learning-rate multipliers by weight set and training phase.

Weight sets, for an L-layer encoder (the paper's 12-layer numbers scaled to L):
- S_I: every weight of the first 10/12 of the layers; S_II: the feed-forward weights of the first 4/12;
- V_I: every weight of the last 2/12 of the layers; V_II: their attention weights.
Phase P1 holds for the first `2 * window` steps and while the mean loss of the last `window` steps is
more than `threshold` below the mean of the `window` steps before; once it ends it stays ended.
Multipliers (equation 2): in P1, S_I gets c1; after P1, V_II gets c2 and S_II gets
R = max(1 - phi^r, 0), phi = (mean of the last window) / (mean of the window before) (equation 3);
every other weight gets 1.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

_LAYER = re.compile(r"\blayers?\.(\d+)\.")
WEIGHT_SETS = ("S_I", "S_II", "V_I", "V_II", "other")


def _is_attention(name: str) -> bool:
    return ".attention." in name or ".attn." in name or ".self_attn." in name


def _is_feed_forward(name: str) -> bool:
    return not _is_attention(name) and (".intermediate." in name or ".output.dense." in name or ".mlp." in name)


@dataclass
class SlowFastPolicy:
    """The policy's constants (the paper's defaults) for a model with `num_layers` layers."""

    num_layers: int
    c1: float = 0.01
    c2: float = 10.0
    r: float = 3.0
    window: int = 100
    threshold: float = 0.1
    fast: bool = True  # policy IV (c2); the paper leaves it out for NER
    losses: deque = field(init=False, repr=False)
    in_first_phase: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        self.losses = deque(maxlen=2 * self.window)

    def weight_set(self, name: str) -> str:
        """The most specific set a parameter (named relative to the base model) belongs to."""
        match = _LAYER.search(name)
        if match is None:
            return "other"
        layer, depth = int(match.group(1)), self.num_layers
        if layer < round(depth * 4 / 12) and _is_feed_forward(name):
            return "S_II"
        if layer < round(depth * 10 / 12):
            return "S_I"
        if layer >= depth - round(depth * 2 / 12):
            return "V_II" if _is_attention(name) else "V_I"
        return "other"

    def record(self, loss: float) -> None:
        """Add a training loss and update the phase (P1 ends once and for all)."""
        self.losses.append(float(loss))
        if self.in_first_phase and len(self.losses) == self.losses.maxlen:
            before, recent = self._means()
            self.in_first_phase = before - recent > self.threshold

    def _means(self) -> tuple[float, float]:
        values = list(self.losses)
        return sum(values[: self.window]) / self.window, sum(values[self.window :]) / self.window

    def phi(self) -> float | None:
        """Mean loss of the last window over the mean of the window before (None until both exist)."""
        if len(self.losses) < self.losses.maxlen:
            return None
        before, recent = self._means()
        return recent / before if before else 1.0

    def multipliers(self) -> dict[str, float]:
        """The current learning-rate multiplier of every weight set."""
        values = dict.fromkeys(WEIGHT_SETS, 1.0)
        if self.in_first_phase:
            values["S_I"] = values["S_II"] = self.c1
            return values
        if self.fast:
            values["V_II"] = self.c2
        phi = self.phi()
        values["S_II"] = max(1.0 - phi**self.r, 0.0) if phi is not None else 1.0
        return values
