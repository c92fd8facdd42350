"""Load predictors, registered in one table: ``PREDICTORS`` is the only place their names live.

A predictor only decides where copies live, never where a token goes, so a wrong prediction
costs speed, not accuracy. Every rank feeds its predictor the same gathered counts in the same
order, so every rank predicts (and plans) the same; float64 NumPy arithmetic keeps it so.

Each predictor says where its numbers come from (``source``, read by ``policy.py``):

- ``HISTORY``: the layer's own past counts (``ema``, ``window``); re-planned every
  ``replan_interval`` steps.
- ``AHEAD``: this batch's counts, predicted before the layer runs by an earlier point of the
  model (``lookahead``: the previous MoE layer applies this layer's gate to its own input;
  ``learned``: a small model distilled from the routers reads the token embeddings). A layer that
  nothing drives falls back to an EMA of its history.
- ``NOW``: this step's real counts, the transfer waited for (``oracle``: an upper bound).

Legend: E logical experts.
"""

from __future__ import annotations

from collections import deque
from typing import Dict, Optional, Type

import numpy as np

__all__ = ["HISTORY", "AHEAD", "NOW", "LoadPredictor", "EmaPredictor", "WindowPredictor", "LookaheadPredictor",
           "LearnedPredictor", "OraclePredictor", "PREDICTORS", "make_predictor", "name_of"]

HISTORY, AHEAD, NOW = "history", "ahead", "now"


class LoadPredictor:
    """Observe each step's global counts; predict the next step's load per expert."""

    source = HISTORY
    needs_file = False  # ``moe_replication.learned_path`` must name a file

    def observe(self, counts_E: np.ndarray) -> None:
        raise NotImplementedError

    def predict(self) -> Optional[np.ndarray]:
        """[E] float64 predicted tokens per expert, or None before the first observation."""
        raise NotImplementedError


class EmaPredictor(LoadPredictor):
    """Exponential moving average: ``pred = decay * pred + (1 - decay) * counts``."""

    def __init__(self, decay: float = 0.5, **_: object) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self._pred: Optional[np.ndarray] = None

    def observe(self, counts_E: np.ndarray) -> None:
        if self._pred is None:
            self._pred = np.array(counts_E, dtype=np.float64)
            return
        # NOTE: the same float operations as decay * pred + (1 - decay) * counts, in two calls
        # (this runs every layer, every step).
        pred = self._pred * self.decay
        pred += np.multiply(counts_E, 1.0 - self.decay, dtype=np.float64)
        self._pred = pred

    def predict(self) -> Optional[np.ndarray]:
        return None if self._pred is None else self._pred.copy()


class WindowPredictor(LoadPredictor):
    """Mean of the last ``window`` steps' counts."""

    def __init__(self, window: int = 8, **_: object) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._steps: deque = deque(maxlen=window)

    def observe(self, counts_E: np.ndarray) -> None:
        self._steps.append(np.asarray(counts_E, dtype=np.float64).copy())

    def predict(self) -> Optional[np.ndarray]:
        return None if not self._steps else np.mean(np.stack(self._steps), axis=0)


class LookaheadPredictor(EmaPredictor):
    """This batch's counts from the previous MoE layer (the EMA serves a layer nothing drives)."""

    source = AHEAD


class LearnedPredictor(EmaPredictor):
    """This batch's counts from the distilled router predictor at the input embeddings."""

    source = AHEAD
    needs_file = True


class OraclePredictor(EmaPredictor):
    """This step's real counts (the EMA is kept only for the statistics' sake)."""

    source = NOW


PREDICTORS: Dict[str, Type[LoadPredictor]] = {
    "ema": EmaPredictor,
    "window": WindowPredictor,
    "lookahead": LookaheadPredictor,
    "learned": LearnedPredictor,
    "oracle": OraclePredictor,
}


def make_predictor(name: str, *, ema_decay: float = 0.5, window: int = 8) -> LoadPredictor:
    """A new predictor of kind ``name`` (a key of ``PREDICTORS``)."""
    try:
        cls = PREDICTORS[name]
    except KeyError:
        raise ValueError(f"moe_replication.predictor: unknown predictor {name!r}; one of {sorted(PREDICTORS)}") from None
    return cls(decay=ema_decay, window=window)


def name_of(cls: Type[LoadPredictor]) -> str:
    """The name ``cls`` is registered under in ``PREDICTORS`` (for code that builds a config)."""
    for name, registered in PREDICTORS.items():
        if registered is cls:
            return name
    raise ValueError(f"{cls.__name__} is not registered in PREDICTORS")
