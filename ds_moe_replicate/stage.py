"""The replication stage shared by the replicated MoE layers (DeepSpeed's legacy ``MOELayer`` in
``layer.py`` and AutoEP's ``AutoEPMoELayer`` in ``autoep.py``): configuration, weights versions,
the replica store and table, the policy's decision and the moves it asks for, the copies that
travel with a step with gradients, the step's statistics and the agreement with ranks where
replication is off. The layers keep only their data path (docs/design.md, "One step").

A layer using it provides ``home_experts`` (its rank's experts as modules, in local order),
``num_experts``, ``ep_size``, ``ep_group`` and ``chain`` (None without lookahead), and calls
``_init_stage`` once.

Legend: E logical experts, W ranks, P physical slots.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
from typing import Callable, Iterator, List, Optional

import numpy as np
import torch

from .comm import SITE_OFF, Fingerprint, GatherBuffer, gather_step, group_rank
from .config import ReplicationConfig
from .fetch import FetchSpec, fetch_replicas
from .hooks import RemovableHandle, StatsHooks, StepStats, step_stats
from .placement import Placement, missing_transfers, plan_transfers
from .policy import Decision, ReplicationPolicy
from .predictor import EmaPredictor, name_of
from .replicas import ExpertLayout, ReplicaStore, ReplicaTable
from .versions import weights_version

__all__ = ["ReplicationStage", "StepState"]


class StepState:
    """What one forward has found so far (local to the call)."""

    def __init__(self) -> None:
        self.error: Optional[BaseException] = None
        self.where = "bad input"
        self.waited_ms = 0.0
        self.moved = 0
        self.received = 0

    def fail(self, err: BaseException, where: str) -> None:
        if self.error is None:
            self.error, self.where = err, where


class ReplicationStage:
    """Mixin: the replication state and control steps of one layer on this rank."""

    def _init_stage(self, replication: ReplicationConfig) -> None:
        self.hooks = StatsHooks()
        self.gather_buffer = GatherBuffer()  # host memory of this layer's all-gathers, reused
        self._last_stats: Optional[StepStats] = None
        self._pending_stats: Optional[Callable[[], StepStats]] = None
        self.runs = 0
        self.uid = 0  # position among the model's replicated layers (configure_replication)
        self._changes = 0
        self._store: Optional[ReplicaStore] = None
        self.configure(replication)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.weights_changed())

    def register_stats_hook(self, fn: Callable[[StepStats], None]) -> RemovableHandle:
        """Call ``fn(stats)`` after every replicated forward; returns a handle with ``remove()``.
        An exception in ``fn`` is raised as ``ReplicationError`` on every rank of the group."""
        return self.hooks.register(fn)

    def configure(self, replication: ReplicationConfig) -> None:
        """Switch config; replica state starts over from the home placement on the next step."""
        if self._store is not None:
            self._store.reset()
        self.replication = replication
        self.config_hash = int.from_bytes(hashlib.blake2b(replication.model_dump_json().encode(),
                                                          digest_size=8).digest(), "little") >> 2
        self.policy = ReplicationPolicy(replication, self.num_experts, self.ep_size)
        self.table = ReplicaTable(self.policy.home.phy2log_P.size)
        self._store = None
        self._agreed_off = False
        self.runs = 0
        self.weights_changed()

    def weights_changed(self) -> None:
        """Every replica of this layer's home experts is stale from now on (called by
        ``load_state_dict``, ``.to()``/``.half()``, ``train()``/``eval()``; call it after
        editing expert weights through ``param.data``)."""
        self._changes += 1

    def train(self, mode: bool = True):
        self.weights_changed()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        # NOTE: the slot buffers are plain tensors (not in state_dict); they are re-made on the
        # next forward where the experts now live, and every copy is refreshed.
        if self._store is not None:
            self._store.reset()
            self.table.cancel()
        self.weights_changed()
        return super()._apply(fn, *args, **kwargs)

    @contextlib.contextmanager
    def shadow(self, enabled: bool = True) -> Iterator[None]:
        """Forwards with gradients inside the block leave the replication state as it was: the
        policy (serving placement, plans, predictor history, step counter), the forward count and
        the last statistics are restored when the block ends. ``enabled=False`` runs the stock
        forward inside the block (the configuration is swapped back afterwards, nothing is reset).
        Only the counter of the point-to-point tags keeps advancing, so no later transfer reuses a
        tag of the block's.

        For checks on the same weights and batch as a training step (``train_lm``'s
        ``--check-exact-every``). Every rank of the group must enter and leave the block at the
        same point, and run the same forwards inside it (they are collective). Steps without
        gradients would prefetch into the replica store, which is not restored: refused.
        """
        if not torch.is_grad_enabled():
            raise RuntimeError("shadow() restores the policy only for forwards with gradients (no store prefetch)")
        saved = copy.copy(self.policy)
        saved.predictor = copy.deepcopy(self.policy.predictor)
        runs, replication, agreed_off = self.runs, self.replication, self._agreed_off
        stats = self._last_stats, self._pending_stats
        if not enabled:
            self.replication = replication.model_copy(update={"enabled": False})
        try:
            yield
        finally:
            transfers = self.policy.transfers
            self.policy, self.runs = saved, runs
            self.policy.transfers = transfers
            self.replication, self._agreed_off = replication, agreed_off
            self._last_stats, self._pending_stats = stats

    def home_params(self) -> List[torch.Tensor]:
        return [p for e in self.home_experts for p in e.parameters()]

    def weights_version(self) -> int:
        return weights_version(self.home_params(), self._changes)

    def grad_step(self) -> bool:
        """This forward computes gradients for the experts (copies then travel with the step)."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.home_params())

    @property
    def store(self) -> ReplicaStore:
        if self._store is None:
            self._store = ReplicaStore(self.home_experts[0], self.policy.slots_per_rank, self.replication.timeout_s)
        self._store.ensure(next(iter(self.home_experts[0].parameters())))
        return self._store

    def _decide(self, global_E: np.ndarray, g, store: Optional[ReplicaStore], grad: bool, step: StepState) -> Decision:
        # NOTE: the policy's state advances alike on every rank even when a rank's transfer
        # fails here (the failure is raised on every rank at the combine), so that every rank
        # still splits over the same placement and the exchanges keep their agreed sizes.
        landed = bool(g.landed_W.all())
        if grad and self.policy.pending is not None:
            # Copies prefetched by earlier steps without gradients: finish them (every rank has
            # them in flight), so the store is idle; this step's copies travel with it.
            store, landed = self.store, True
        if store is not None and store.in_flight and landed:
            try:
                step.waited_ms += store.land()
            except Exception as err:  # noqa: BLE001 - reported to every rank through combine
                step.fail(err, "replica transfer")
            self.table.commit()
        decision = self.policy.decide(global_E, landed, lambda pl: self.table.valid(pl, g.version_W), grad)
        if decision.prefetch_now:
            try:
                self._move(decision.prefetch, g.version_W, step)
                step.waited_ms += self.store.land()
            except Exception as err:  # noqa: BLE001 - reported to every rank through combine
                step.fail(err, "replica transfer")
            self.table.commit()
            self.policy.land_pending()
        return decision

    def _start_over(self) -> None:
        """After a failed step (on every rank alike): replica state starts over from the home
        placement; transfers in flight are abandoned (their tags are never reused)."""
        if self._store is not None:
            self._store.reset(wait=False)
        generation = self.policy.transfers
        self.policy = ReplicationPolicy(self.replication, self.num_experts, self.ep_size)
        self.policy.transfers = generation
        self.table = ReplicaTable(self.policy.home.phy2log_P.size)
        if self.chain is not None and self.chain.is_driven(self):
            self.policy.driven = True

    def _move(self, new: Placement, version_W: np.ndarray, step: Optional[StepState] = None) -> None:
        """Start moving the copies of ``new`` that are not resident and current."""
        transfers = missing_transfers(new, self.table.valid(new, version_W))
        group = self.ep_group
        self.policy.transfers += 1
        received = self.store.start(transfers, self.home_experts, group_rank(group), group, new.experts_per_rank,
                                    tag=self._tag())
        self.table.begin(transfers, new, version_W)
        if step is not None:
            step.moved += len(transfers) * self.store.bytes_per_replica
            step.received += received

    def _tag(self) -> int:
        """The point-to-point tag of this layer's current transfer: the same on every rank, and
        never that of an earlier (possibly abandoned) transfer of this layer."""
        return (self.uid * 65521 + self.policy.transfers) % (1 << 24)

    def _fetch(self, placement: Placement, rank: int, group, step: StepState):
        layout = ExpertLayout(self.home_experts[0])
        transfers = plan_transfers(None, placement)
        params = self.home_params()
        self.policy.transfers += 1
        spec = FetchSpec(transfers, rank, group, placement.experts_per_rank, len(layout.names), layout.numel,
                         self.replication.timeout_s, tag=self._tag())
        buf_QN, anchor = fetch_replicas(spec, params)
        # Weights out and gradients back.
        per_copy = layout.numel * params[0].element_size()
        step.moved += 2 * len(transfers) * per_copy
        step.received += 2 * buf_QN.shape[0] * per_copy
        return (spec, buf_QN, layout), anchor

    def _travel(self, x_TH: torch.Tensor, placement: Placement, rank: int, group, step: StepState):
        """With gradients: start the copies' weights travelling with the step (``fetch.py``) and
        place the anchor that orders their gradients' return — on the tokens before the dispatch,
        or on the layer's output when the tokens need no gradient (adding it to them would make
        autograd compute an input gradient the stock layer skips).

        Returns:
            (what ``_fetch`` returned or None on failure, the tokens, the output's anchor or None).
        """
        try:
            fetched, anchor = self._fetch(placement, rank, group, step)
        except Exception as err:  # noqa: BLE001 - reported to every rank with the step's status
            step.fail(err, "replica transfer")
            return None, x_TH, None
        if x_TH.requires_grad:
            return fetched, x_TH + anchor, None
        return fetched, x_TH, anchor

    @property
    def last_stats(self) -> Optional[StepStats]:
        """The ``StepStats`` of the last replicated forward (None before any), built when first
        read: a step nobody observes pays only for keeping its numbers (docs/control_path.md)."""
        if self._pending_stats is not None:
            self._last_stats, self._pending_stats = self._pending_stats(), None
        return self._last_stats

    def _stats(self, decision: Decision, total_E, split, step: StepState, grad: bool) -> Callable[[], StepStats]:
        """The step's statistics, deferred: every number is taken now, the record is built on
        demand (``step_stats``), so it does not depend on when it is read."""
        policy = self.policy
        return functools.partial(
            step_stats, policy.step - 1, decision.placement, total_E, split, policy.prediction,
            replanned=decision.replanned, activated=decision.activated, bytes_moved=step.moved,
            bytes_received=step.received, exposed_wait_ms=step.waited_ms,
            predictor=self.replication.predictor if policy.source == policy.predictor.source else name_of(EmaPredictor),
            prefetch_late=decision.late, training=grad)

    def _publish_stats(self, pending: Callable[[], StepStats]) -> None:
        """Keep the step's deferred statistics; build and hand them to the hooks if any are registered."""
        self._pending_stats = pending
        if self.hooks:
            self.hooks(self.last_stats)

    def _agree_replication_off(self, x: torch.Tensor) -> None:
        """Once per configuration, tell the other ranks that replication is off here: a rank with
        it on gets a clear error instead of mismatched collectives."""
        if self._agreed_off or self.ep_size == 1 or self.ep_group is None:
            return
        self._agreed_off = True
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        gather_step(counts, Fingerprint(SITE_OFF, self.config_hash), self.ep_group)
