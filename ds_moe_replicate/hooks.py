"""Per-step statistics of a replicated layer, and the observers that receive them.

The layer builds one ``StepStats`` record per replicated forward and hands it to every
registered observer; there are no timers or prints in ``forward``. The only measured time is
the wait for replica weights, taken where the wait happens (``replicas.py``).

Legend: E logical experts, W expert-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from . import native
from .predictor import EmaPredictor, name_of

__all__ = ["StepStats", "StatsHooks", "RemovableHandle", "prediction_quality", "step_stats"]


@dataclass(frozen=True)
class StepStats:
    """What one replicated forward did.

    Attributes:
        step: forward steps of this layer in replicated mode so far (0-based).
        plan_version: version of the placement used (0 = DeepSpeed's home placement).
        counts_E: int64 [E] routes per logical expert, summed over the expert-parallel group.
        rank_tokens_W: int64 [W] routes each rank actually computed.
        balancedness: mean / max of ``rank_tokens_W`` (1.0 when nothing was computed).
        dropped_tokens: routes dropped over capacity, whole group (0 when dropless).
        num_replicas: replica slots in use by the active placement.
        replanned: a new plan was made (and its prefetch started) at this step.
        activated: a new plan became active at the start of this step.
        bytes_moved: replica weight bytes whose transfer started at this step, whole group.
        bytes_received: of those, the bytes this rank receives.
        exposed_wait_ms: time spent waiting for replica weights since the previous record
            (transfers that had not finished when they had to).
        predictor: what predicted the active plan's loads ("ema", "window", "lookahead", "oracle").
        predicted_E: float64 [E] the loads the active plan was made for (None before any plan).
        prediction_l1: L1 distance between predicted and actual load shares (NaN without a plan).
        hot_recall: fraction of the truly hot experts (load above a mean rank's) that the
            prediction also had hot (NaN without a plan; 1.0 when none is hot).
        prefetch_late: a plan's weights were still in flight on some rank, so the previous plan
            served this step.
        training: the step computed gradients (replica weights travelled with the step and their
            gradients went home).
    """

    step: int
    plan_version: int
    counts_E: torch.Tensor
    rank_tokens_W: torch.Tensor
    balancedness: float
    dropped_tokens: int
    num_replicas: int
    replanned: bool = False
    activated: bool = False
    bytes_moved: int = 0
    bytes_received: int = 0
    exposed_wait_ms: float = 0.0
    predictor: str = name_of(EmaPredictor)
    predicted_E: Optional[torch.Tensor] = None
    prediction_l1: float = float("nan")
    hot_recall: float = float("nan")
    prefetch_late: bool = False
    training: bool = False


class RemovableHandle:
    def __init__(self, registry: Dict[int, Callable], key: int) -> None:
        self._registry, self._key = registry, key

    def remove(self) -> None:
        self._registry.pop(self._key, None)


class StatsHooks:
    """Observers of ``StepStats``: ``handle = hooks.register(fn)``; ``handle.remove()``."""

    def __init__(self) -> None:
        self._fns: Dict[int, Callable[[StepStats], None]] = {}
        self._next = 0

    def register(self, fn: Callable[[StepStats], None]) -> RemovableHandle:
        if not callable(fn):
            raise TypeError(f"a stats hook must be callable, got {type(fn).__name__}")
        self._next += 1
        self._fns[self._next] = fn
        return RemovableHandle(self._fns, self._next)

    def __len__(self) -> int:
        return len(self._fns)

    def __call__(self, stats: StepStats) -> None:
        for fn in list(self._fns.values()):
            fn(stats)


def prediction_quality(predicted_E: Optional[np.ndarray], actual_E: np.ndarray, ep_size: int) -> Tuple[float, float]:
    """(L1 distance between predicted and actual load shares, recall of the hot experts).

    Hot experts are those whose actual load exceeds a mean rank's load (the ones that need
    copies); recall is the fraction of them the prediction also puts above its mean rank load.
    Both are NaN without a prediction; recall is 1.0 when no expert is hot. (Each step's
    statistics compute the same in compiled code, ``native.step_stats``; this is its twin.)
    """
    if predicted_E is None:
        return float("nan"), float("nan")
    pred = np.asarray(predicted_E, dtype=np.float64)
    act = np.asarray(actual_E, dtype=np.float64)
    p_share = pred / pred.sum() if pred.sum() > 0 else np.full_like(pred, 1.0 / pred.size)
    a_share = act / act.sum() if act.sum() > 0 else np.full_like(act, 1.0 / act.size)
    hot = a_share > 1.0 / ep_size
    recall = float((p_share[hot] > 1.0 / ep_size).mean()) if hot.any() else 1.0
    return float(np.abs(p_share - a_share).sum()), recall


def step_stats(step: int, placement, total_E: np.ndarray, split, prediction: Optional[np.ndarray],
               **fields) -> StepStats:
    """The step's record from its gathered numbers (the one place the statistics are computed).

    Args:
        step: the layer's step index. placement: the placement that served the step.
        total_E: int64 [E] the step's routes per expert, summed over the group (``Gathered.total_E``).
        split: the step's ``split.RankSplit`` (its quotas give every rank's load).
        prediction: [E] the loads the serving plan was made for, or None.
        fields: the remaining ``StepStats`` fields (replanned, activated, bytes, waits, ...).
    """
    W = placement.ep_size
    pred = None if prediction is None else np.ascontiguousarray(prediction, dtype=np.float64)
    total_E = np.ascontiguousarray(total_E, dtype=np.int64)
    fast = native.step_stats(np.ascontiguousarray(split.quota_P, dtype=np.int64), W, total_E,
                             pred) if pred is None or pred.shape == total_E.shape else None
    if fast is not None:
        rank_W, bal, dropped, l1, recall = fast
    else:  # the NumPy twin
        rank_W = split.rank_load_W
        top = int(rank_W.max()) if rank_W.size else 0
        bal = float(rank_W.sum() / W / top) if top > 0 else 1.0
        dropped = int(total_E.sum() - split.quota_P.sum())
        l1, recall = prediction_quality(prediction, total_E, W)
    return StepStats(step=step, plan_version=placement.version, counts_E=torch.from_numpy(total_E),
                     rank_tokens_W=torch.from_numpy(rank_W), balancedness=bal, dropped_tokens=dropped,
                     num_replicas=placement.num_replicas, predicted_E=None if pred is None else torch.from_numpy(pred),
                     prediction_l1=l1, hot_recall=recall, **fields)
