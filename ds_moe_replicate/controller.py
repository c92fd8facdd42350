"""Observe, plan, prefetch: the replication state of one layer across steps.

Every rank feeds the same gathered numbers into its controller in the same order, so every rank
plans at the same step, derives the same placement and the same transfer list, and switches to
the new placement at the same step: the first one whose all-gather reports that every rank's
transfers have landed.

Where a plan's predicted loads come from depends on ``moe_replication.predictor``:

- ``"ema"`` / ``"window"``: the layer's own history, re-planned every ``replan_interval`` steps.
- ``"lookahead"``: this batch's loads, predicted by the previous layer (or the model's input
  embeddings) applying this layer's gate to its own input, and prefetched while that layer
  computes. A layer nothing drives (the first one, with no entry hook) falls back to ``"ema"``.
- ``"oracle"``: this step's real counts, with the transfer waited for (an upper bound for
  experiments: perfect knowledge, exposed transfer time).

Legend: E logical experts, W expert-parallel ranks, S replica slots per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .config import ReplicationConfig
from .placement import Placement
from .planner import plan_replicas
from .predictor import EmaPredictor, make_predictor
from .placement import plan_transfers
from .replicas import ReplicaStore

__all__ = ["ReplicationController", "Traffic"]


@dataclass(frozen=True)
class Traffic:
    """Replica movement since the layer's last step record."""

    replanned: bool
    bytes_moved: int
    bytes_received: int
    exposed_wait_ms: float


class ReplicationController:
    """Active placement, predictor and replica slots of one layer on this rank."""

    def __init__(self, config: ReplicationConfig, num_experts: int, ep_size: int, template: nn.Module) -> None:
        self.config = config
        self.num_experts = num_experts
        self.ep_size = ep_size
        # NOTE: with one rank there is nowhere to put a copy; keep the slot layout empty.
        slots = config.slots_per_rank if ep_size > 1 else 0
        self.placement = Placement.home(num_experts, ep_size, slots)
        history = config.predictor in ("ema", "window")  # the others fall back to an EMA
        self.history = make_predictor(config) if history else EmaPredictor(config.ema_decay)
        self.store = ReplicaStore(template, slots) if slots > 0 else None
        self.driven = False  # set when a previous layer (or the entry hook) predicts this layer
        self.step = 0
        self.prediction: Optional[np.ndarray] = None  # loads behind the active placement
        self._pending_prediction: Optional[np.ndarray] = None
        self._replanned, self._moved, self._received, self._wait_ms = False, 0, 0, 0.0

    @property
    def slots_per_rank(self) -> int:
        return self.placement.slots_per_rank

    def begin_step(self, like: torch.Tensor) -> None:
        """Make sure the slots live where the experts do (and have their dtype)."""
        if self.store is not None:
            self.store.ensure(like)

    def poll(self) -> bool:
        """True if no replica transfer of this layer is still in flight on this rank."""
        return self.store is None or self.store.poll()

    def settle(self, all_landed: bool) -> bool:
        """Switch to the plan in flight if every rank reported it landed; True if switched."""
        if self.store is None or not self.store.in_flight or not all_landed:
            return False
        new, waited_ms = self.store.land()
        self._wait_ms += waited_ms
        self.placement, self.prediction = new, self._pending_prediction
        return True

    @property
    def late(self) -> bool:
        """A plan is still in flight (it was not landed on every rank at this step)."""
        return self.store is not None and self.store.in_flight

    def prefetch(self, predicted_E: np.ndarray, home_experts: Sequence[nn.Module], rank: int, group) -> None:
        """Plan for ``predicted_E`` and start moving the new replicas' weights."""
        if self.store is None:
            return
        if self.store.in_flight:
            # The previous plan did not land in time for its step. Every rank reaches this point
            # at the same step, so finishing its transfers (normally done by now) and switching
            # to it here keeps the ranks in agreement, and the next plan starts from it.
            self.settle(True)
        predicted_E = np.asarray(predicted_E, dtype=np.float64)
        plan = plan_replicas(predicted_E, self.ep_size, self.slots_per_rank)
        new = plan.placement(version=self.placement.version + 1)
        self._replanned = True
        if np.array_equal(new.phy2log_P, self.placement.phy2log_P):
            self.prediction = predicted_E
            return
        transfers = plan_transfers(self.placement, new)
        self._received += self.store.start(transfers, new, home_experts, rank, group)
        self._moved += len(transfers) * self.store.bytes_per_replica
        self._pending_prediction = predicted_E

    def observe(self, counts_E: np.ndarray, home_experts: Sequence[nn.Module], rank: int, group) -> None:
        """Feed this step's global counts; at a history re-plan step, plan and start the prefetch."""
        self.history.observe(counts_E)
        driven = self.driven and self.config.predictor in ("lookahead", "learned")
        if self.store is None or driven or self.config.predictor == "oracle":
            return
        if self.step % self.config.replan_interval or self.store.in_flight:
            return
        self.prefetch(self.history.predict(), home_experts, rank, group)

    def oracle(self, counts_E: np.ndarray, home_experts: Sequence[nn.Module], rank: int, group) -> bool:
        """Plan for this step's real counts and wait for the weights; True if the plan changed."""
        if self.store is None:
            return False
        self.prefetch(counts_E, home_experts, rank, group)
        return self.settle(True)

    def end_step(self) -> Traffic:
        """Close the step; returns the replica traffic since the previous step record."""
        self.step += 1
        traffic = Traffic(self._replanned, self._moved, self._received, self._wait_ms)
        self._replanned, self._moved, self._received, self._wait_ms = False, 0, 0, 0.0
        return traffic
