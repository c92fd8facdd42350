"""Observe, plan, prefetch: the replication state of one layer across steps.

Every rank feeds the same gathered counts into its controller in the same order, so every rank
re-plans at the same step, derives the same placement and the same transfer list, and activates
the new placement at the start of the next step, once its replica weights have landed.

Legend: E logical experts, W expert-parallel ranks, S replica slots per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .config import ReplicationConfig
from .dispatch import Placement
from .planner import plan_replicas
from .predictor import make_predictor
from .replicas import ReplicaStore, plan_transfers

__all__ = ["ReplicationController", "Prefetch"]


@dataclass(frozen=True)
class Prefetch:
    """What ``observe`` started: a new plan and its transfers (zeros when it did not re-plan)."""

    replanned: bool = False
    bytes_moved: int = 0
    bytes_received: int = 0


class ReplicationController:
    """Active placement, predictor and replica slots of one layer on this rank."""

    def __init__(self, config: ReplicationConfig, num_experts: int, ep_size: int, template: nn.Module) -> None:
        self.config = config
        self.num_experts = num_experts
        self.ep_size = ep_size
        # NOTE: with one rank there is nowhere to put a copy; keep the slot layout empty.
        slots = config.slots_per_rank if ep_size > 1 else 0
        self.placement = Placement.home(num_experts, ep_size, slots)
        self.predictor = make_predictor(config)
        self.store = ReplicaStore(template, slots) if slots > 0 else None
        self.step = 0

    def begin_step(self, like: torch.Tensor):
        """Land replica weights in flight; returns (activated, ms waited)."""
        if self.store is None:
            return False, 0.0
        self.store.ensure(like)
        new, waited_ms = self.store.land()
        if new is not None:
            self.placement = new
        return new is not None, waited_ms

    def observe(self, counts_E: np.ndarray, home_experts: Sequence[nn.Module], rank: int, group) -> Prefetch:
        """Feed this step's global counts; at a re-plan step, plan and start the prefetch."""
        self.predictor.observe(counts_E)
        due = self.step % self.config.replan_interval == 0
        if self.store is None or not due:
            return Prefetch()
        predicted = self.predictor.predict()
        plan = plan_replicas(predicted, self.ep_size, self.placement.slots_per_rank)
        new = Placement.from_plan(plan, version=self.placement.version + 1)
        if np.array_equal(new.phy2log_P, self.placement.phy2log_P):
            return Prefetch(replanned=True)
        transfers = plan_transfers(self.placement, new)
        received = self.store.start(transfers, new, home_experts, rank, group)
        return Prefetch(True, len(transfers) * self.store.bytes_per_replica, received)

    def end_step(self) -> None:
        self.step += 1
