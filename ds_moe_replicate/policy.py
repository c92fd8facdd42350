"""The replication policy of one layer: gathered numbers in, a decision out. No process group.

Every rank feeds its policy the same gathered numbers in the same order, so every rank decides
the same: the same placement serves the step, the same plan is made at the same step, the same
copies move (docs/design.md, "Control path"). The layer carries the decision out (``layer.py``):
it splits tokens over ``Decision.placement`` and moves the copies the decision names.

Two ways copies get their weights, chosen per step by the layer (``grad``):

- steps with gradients (training): the copies of the serving placement travel with the step
  (``fetch.py``), so the plan for this step can be used at once;
- steps without gradients (inference): copies are prefetched into the replica store and a plan
  serves only from the step at which every rank reported its copies landed.

Where a plan's loads come from is the predictor's ``source`` (``predictor.py``): HISTORY plans
every ``replan_interval`` steps for the steps after; AHEAD is told this step's loads before the
layer runs (``offer``); NOW plans for this step's real counts and waits for the copies.

Legend: E logical experts, W ranks, P physical slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .config import ReplicationConfig
from .placement import Placement
from .predictor import AHEAD, HISTORY, NOW, make_predictor
from .replan import replan

__all__ = ["Decision", "ReplicationPolicy"]


@dataclass
class Decision:
    """What one step does (read-only by convention: built every step, and a frozen dataclass
    costs microseconds to build).

    Attributes:
        placement: the placement that serves this step (without copies that are stale or in flight).
        activated: a newly planned placement serves from this step on.
        prefetch: a placement whose copies to start moving (steps without gradients), or None.
        prefetch_now: move them before this step's dispatch and wait (NOW); otherwise after the
            layer's experts ran, for a later step.
        replanned: a plan was made at this step.
        late: copies in flight had not landed on every rank, so the previous placement serves.
    """

    placement: Placement
    activated: bool = False
    prefetch: Optional[Placement] = None
    prefetch_now: bool = False
    replanned: bool = False
    late: bool = False


class ReplicationPolicy:
    """Placement, plans and predictor of one layer (the same state on every rank)."""

    def __init__(self, config: ReplicationConfig, num_experts: int, ep_size: int) -> None:
        self.config = config
        self.num_experts, self.ep_size = num_experts, ep_size
        # NOTE: with one rank there is nowhere to put a copy; keep the slot layout empty.
        self.slots_per_rank = config.slots_per_rank if ep_size > 1 else 0
        self.home = Placement.home(num_experts, ep_size, self.slots_per_rank)
        self.active = self.home          # serves (its copies resident, or fetched with the step)
        self.pending: Optional[Placement] = None  # copies in flight (steps without gradients)
        self.predictor = make_predictor(config.predictor, ema_decay=config.ema_decay, window=config.window)
        self.driven = False              # an earlier point of the model predicts this layer (AHEAD)
        self.step = 0
        self.version = 0
        self.transfers = 0               # transfers started so far (their point-to-point tags)
        self.prediction: Optional[np.ndarray] = None  # loads behind the serving plan
        self._pending_prediction: Optional[np.ndarray] = None
        self._offered: Optional[np.ndarray] = None
        self._serving: tuple = (None, None, None)  # (active, its valid slots, the serving placement)

    @property
    def source(self) -> str:
        """Where this layer's plans come from (an AHEAD predictor nothing drives uses its history)."""
        src = self.predictor.source
        return HISTORY if src == AHEAD and not self.driven else src

    @property
    def enabled(self) -> bool:
        return self.slots_per_rank > 0

    def plan(self, load_E: np.ndarray, grad: bool) -> Placement:
        """The placement for ``load_E``: only replicas that lower the predicted largest rank load
        by more than they cost (``replica_cost``, twice in training); else the home placement.

        Every plan starts from the active placement (``replan.py``, compiled: a placement that
        still serves is kept, otherwise the copies no longer needed are freed and new ones added
        greedily; most copies stay, so few weights move). The same for the predictors that plan
        every step (AHEAD, NOW) and for the history predictors every ``replan_interval`` steps
        (``plan_replicas`` from scratch took milliseconds at E = 256, W = 64; docs/control_path.md)."""
        load_E = np.ascontiguousarray(load_E, dtype=np.float64)
        cost = self.config.replica_cost * (2.0 if grad else 1.0)
        target = min(1.0 / (1.0 + cost), 0.995)
        # NOTE: at the active version, a kept placement is the active one (nothing built).
        done = replan(load_E, self.active, target_balancedness=target, keep_balancedness=min(target, 0.98),
                      version=self.version, with_quotas=True)
        placement = done.placement
        if placement.num_replicas and \
                done.home_max - done.plan_max <= cost * done.tokens / self.ep_size * placement.num_replicas:
            placement = self.home
        if placement.phy2log_P is self.active.phy2log_P or np.array_equal(placement.phy2log_P, self.active.phy2log_P):
            return self.active
        self.version += 1
        return placement if placement.version == self.version else placement.with_version(self.version)

    def offer(self, predicted_E: np.ndarray, grad: bool) -> Optional[Placement]:
        """This step's loads, predicted before the layer runs (AHEAD). Returns the placement whose
        copies to prefetch now (steps without gradients), or None."""
        self._offered = np.asarray(predicted_E, dtype=np.float64)
        if grad or not self.enabled:
            return None
        if self.pending is not None:
            # NOTE: the previous prefetch did not land in time for its step. Every rank reaches
            # this point at the same step, so finishing it (the layer waits) keeps them agreed.
            return None
        new = self.plan(self._offered, grad=False)
        if new is self.active:
            self.prediction = self._offered
            return None
        self.pending, self._pending_prediction = new, self._offered
        return new

    def land_pending(self) -> Optional[Placement]:
        """The layer finished the copies in flight (waited): they serve from now on."""
        new, self.pending = self.pending, None
        if new is not None:
            self.active, self.prediction = new, self._pending_prediction
        return new

    def decide(self, counts_E: np.ndarray, landed: bool, valid_of: Callable[[Placement], np.ndarray],
               grad: bool) -> Decision:
        """The step's decision, from its gathered numbers (before its dispatch).

        Args:
            counts_E: this step's routes per expert, summed over the group.
            landed: every rank reported its copies in flight landed.
            valid_of: bool [P] of a placement: its slots whose copies are resident and current
                (unused with ``grad``: the copies travel with the step). A read-only answer; while
                it returns the same array object for the active placement, the serving placement
                of the last step is reused (``ReplicaTable.valid`` keeps its last answer).
            grad: the step computes gradients.
        """
        if not self.enabled:
            return Decision(self.active)
        offered, self._offered = self._offered, None
        src = self.source
        if grad:
            if self.pending is not None and landed:
                self.land_pending()
            load = {NOW: counts_E, AHEAD: offered}.get(src)
            if load is None and src == HISTORY and self.step % self.config.replan_interval == 0:
                load = self.predictor.predict()
            if load is None:
                return Decision(self.active)
            new = self.plan(load, grad=True)
            activated = new is not self.active
            self.active, self.prediction = new, np.asarray(load, dtype=np.float64)
            return Decision(new, activated=activated, replanned=True)
        activated = late = False
        if self.pending is not None:
            if landed:
                activated = self.land_pending() is not None
            else:
                late = True
        valid = valid_of(self.active)
        cached = self._serving
        if cached[0] is self.active and cached[1] is valid:  # the same answer as last step's
            serving = cached[2]
        else:
            serving = self.active.without(~valid)
            self._serving = (self.active, valid, serving)
        if src == NOW and self.pending is None:
            new = self.plan(counts_E, grad=False)
            if new is not self.active or serving is not self.active:
                # Plan for this very step and wait for its copies (an upper bound: exposed transfer).
                self.pending, self._pending_prediction = new, np.asarray(counts_E, dtype=np.float64)
                return Decision(new, activated=True, prefetch=new, prefetch_now=True, replanned=True, late=late)
            self.prediction = np.asarray(counts_E, dtype=np.float64)
            return Decision(serving, activated=activated, replanned=True, late=late)
        return Decision(serving, activated=activated, late=late)

    def close(self, counts_E: np.ndarray, serving: Placement, grad: bool) -> Optional[Placement]:
        """End the step: feed its counts to the predictor; returns the placement whose copies to
        start moving now, after the layer's experts ran (steps without gradients), or None.

        Args:
            counts_E: this step's routes per expert, summed over the group.
            serving: the placement that served the step (``Decision.placement``).
            grad: the step computed gradients.
        """
        self.predictor.observe(counts_E)
        step, self.step = self.step, self.step + 1
        if grad or not self.enabled or self.pending is not None:
            return None
        prefetch = None
        if self.source == HISTORY and step % self.config.replan_interval == 0:
            load = self.predictor.predict()
            new = self.plan(load, grad=False)
            if new is not self.active:
                prefetch, self._pending_prediction = new, load
            else:
                self.prediction = load
        if prefetch is None and self.source != NOW and serving is not self.active:
            # Copies of the active plan are stale or missing: move them again.
            prefetch, self._pending_prediction = self.active, self.prediction
        self.pending = prefetch
        return prefetch
