"""Load predictors: gathered expert counts in, next step's expected load per expert out.

A predictor only decides where copies live, never where a token goes, so a wrong prediction
costs speed, not accuracy. Every rank feeds its predictor the same gathered counts in the same
order, so every rank predicts (and plans) the same. Float64 NumPy arithmetic keeps it so.

Legend: E logical experts.
"""

from __future__ import annotations

from collections import deque
from typing import Optional, Protocol

import numpy as np

from .config import ReplicationConfig

__all__ = ["LoadPredictor", "EmaPredictor", "WindowPredictor", "make_predictor"]


class LoadPredictor(Protocol):
    """Observe each step's global counts; predict the next step's load per expert."""

    def observe(self, counts_E: np.ndarray) -> None:
        ...

    def predict(self) -> Optional[np.ndarray]:
        """[E] float64 predicted tokens per expert, or None before the first observation."""
        ...


class EmaPredictor:
    """Exponential moving average: ``pred = decay * pred + (1 - decay) * counts``."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self._pred: Optional[np.ndarray] = None

    def observe(self, counts_E: np.ndarray) -> None:
        counts = np.asarray(counts_E, dtype=np.float64)
        self._pred = counts.copy() if self._pred is None else self.decay * self._pred + (1.0 - self.decay) * counts

    def predict(self) -> Optional[np.ndarray]:
        return None if self._pred is None else self._pred.copy()


class WindowPredictor:
    """Mean of the last ``window`` steps' counts."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._steps: deque = deque(maxlen=window)

    def observe(self, counts_E: np.ndarray) -> None:
        self._steps.append(np.asarray(counts_E, dtype=np.float64).copy())

    def predict(self) -> Optional[np.ndarray]:
        return None if not self._steps else np.mean(np.stack(self._steps), axis=0)


def make_predictor(config: ReplicationConfig) -> LoadPredictor:
    """The predictor named by ``config.predictor``."""
    if config.predictor == "ema":
        return EmaPredictor(config.ema_decay)
    if config.predictor == "window":
        return WindowPredictor(config.window)
    raise ValueError(f"moe_replication.predictor: unknown predictor {config.predictor!r}")
