"""The layer's replication policy, driven in one process with a fake store: the benchmarks'
stand-in for the control path of ``ReplicatedMoE`` (docs/design.md, "Control path").

The cost model and the many-rank emulation do not re-implement history, re-plan or oracle
semantics; each emulated layer owns a ``policy.ReplicationPolicy`` and feeds it one step's
gathered counts in the order the layer does (``layer.py``, steps without gradients):

1. ``offer`` (AHEAD predictors only): this batch's predicted loads, before the layer runs;
2. ``decide``: which placement serves, given whether the copies in flight landed and which
   copies are valid (``ReplicaTable``, the layer's own table);
3. with ``prefetch_now`` (NOW): the copies move before the dispatch and the step waits for them;
4. ``close``: the step's counts go to the predictor; a new plan's copies start moving.

``FakeStore`` moves no weights: a prefetch started at one step lands at the next step's poll (a
transfer hidden behind one layer's compute), an offered prefetch by the layer's own poll (hidden
behind the previous layer), and a NOW prefetch at once, the step waiting for it. It counts the
bytes each transfer would carry.

Legend: E logical experts, W ranks, P physical slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from ..config import ReplicationConfig
from ..placement import Placement, Transfer, missing_transfers
from ..policy import Decision, ReplicationPolicy
from ..replicas import ReplicaTable

__all__ = ["FakeStore", "DrivenStep", "DrivenLayer"]


class FakeStore:
    """Replica copies without weights: which slot holds which expert, and what moving them costs.

    Attributes:
        table: the layer's ``ReplicaTable`` (weights versions stay 0: nothing trains here).
        bytes_moved: bytes of every transfer started so far (``bytes_per_replica`` each).
    """

    def __init__(self, num_slots: int, ep_size: int, bytes_per_replica: float = 1.0) -> None:
        self.table = ReplicaTable(num_slots)
        self.version_W = np.zeros(ep_size, dtype=np.int64)
        self.bytes_per_replica = bytes_per_replica
        self.bytes_moved = 0.0
        self._lands_at: Optional[int] = None  # step whose poll finds the copies in flight landed

    @property
    def in_flight(self) -> bool:
        return self._lands_at is not None

    def valid(self, placement: Placement) -> np.ndarray:
        """bool [P]: slots of ``placement`` whose copy landed (home slots: True)."""
        return self.table.valid(placement, self.version_W)

    def start(self, new: Placement, lands_at: int) -> List[Transfer]:
        """Start moving the copies of ``new`` that are not resident; they land at step ``lands_at``."""
        transfers = missing_transfers(new, self.valid(new))
        self.table.begin(transfers, new, self.version_W)
        self.bytes_moved += len(transfers) * self.bytes_per_replica
        self._lands_at = lands_at
        return transfers

    def poll(self, step: int) -> bool:
        """Every copy in flight landed by ``step``."""
        return self._lands_at is None or self._lands_at <= step

    def land(self) -> None:
        self.table.commit()
        self._lands_at = None


@dataclass(frozen=True)
class DrivenStep:
    """What one emulated step of one layer did.

    Attributes:
        decision: the policy's decision (``decision.placement`` served the step).
        waited_W: float64 [W] replicas each rank received while the step waited for them (NOW).
        bytes_moved: bytes of the transfers started at this step.
    """

    decision: Decision
    waited_W: np.ndarray
    bytes_moved: float

    @property
    def placement(self) -> Placement:
        return self.decision.placement


class DrivenLayer:
    """One layer's ``ReplicationPolicy`` and a ``FakeStore``, fed as ``ReplicatedMoE`` feeds them."""

    def __init__(self, config: ReplicationConfig, num_experts: int, ep_size: int,
                 bytes_per_replica: float = 1.0) -> None:
        self.policy = ReplicationPolicy(config, num_experts, ep_size)
        self.ep_size = ep_size
        self.store = FakeStore(self.policy.home.phy2log_P.size, ep_size, bytes_per_replica)
        self.step = 0

    def step_forward(self, counts_E: np.ndarray, ahead_E: Optional[np.ndarray] = None) -> DrivenStep:
        """One step without gradients.

        Args:
            counts_E: [E] this step's routes per expert, summed over the group.
            ahead_E: [E] this step's loads as predicted before the layer ran (AHEAD predictors;
                the policy is then marked driven, as the lookahead chain marks a driven layer).

        Returns:
            The step's ``DrivenStep``.
        """
        policy, store, step = self.policy, self.store, self.step
        counts_E = np.asarray(counts_E, dtype=np.float64)
        moved0 = store.bytes_moved
        waited_W = np.zeros(self.ep_size)
        if ahead_E is not None:
            policy.driven = True
            if policy.pending is not None:
                # The previous prefetch missed its step: finish it here, as the layer does.
                store.land()
                policy.land_pending()
            new = policy.offer(ahead_E, grad=False)
            if new is not None:
                store.start(new, lands_at=step)
        landed = store.poll(step)
        if store.in_flight and landed:
            store.land()
        decision = policy.decide(counts_E, landed, store.valid, grad=False)
        if decision.prefetch_now:
            transfers = store.start(decision.prefetch, lands_at=step)
            # NOTE: copies land in parallel, so the wait is the busiest receiving rank's.
            waited_W = np.bincount([t.dst for t in transfers], minlength=self.ep_size).astype(np.float64)
            store.land()
            policy.land_pending()
        after = policy.close(counts_E, decision.placement, grad=False)
        if after is not None:
            store.start(after, lands_at=step + 1)
        self.step += 1
        return DrivenStep(decision, waited_W, store.bytes_moved - moved0)
