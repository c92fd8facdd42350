"""``ReplicatedAutoEPLayer``: DeepSpeed AutoEP's ``AutoEPMoELayer`` with predictive expert replication.

AutoEP (``"expert_parallel"`` in the DeepSpeed config) swaps a Hugging Face model's MoE blocks
for ``AutoEPMoELayer`` inside ``deepspeed.initialize``: router -> ragged all-to-all -> grouped
experts -> combine. This subclass changes two things only:

- the split plan: routes go to physical slots (home experts + replica slots, ``Placement``), the
  counts of each slot from ``transport_rank`` on the step's gathered counts, instead of one slot per
  expert;
- the expert step: AutoEP's grouped experts run over home rows and replica rows at once, a
  replica slot with its copy's weights (slices of the grouped tensors, ``grouped_experts.py``).

Router, grouped experts, ``combine_from_routed``, parameters and therefore checkpoints stay
AutoEP's. A layer becomes one in place (``adopt``), after AutoEP's replacement, so the engine's
optimizer and ZeRO keep the very same parameters. Copies come from the ``ReplicaStore`` in steps
without gradients (version-checked through the ``ReplicaTable``) and travel with the step in steps
with gradients (``fetch.py``); decisions come from the layer's ``ReplicationPolicy``.

Legend: T tokens on this rank, H hidden, K routes per token, E logical experts, W ranks,
E_loc home experts per rank, S replica slots per rank, C = E_loc + S, P = W * C, N routes this
rank sends, M rows this rank receives.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
from deepspeed.module_inject.auto_ep_comm import COMM_BACKEND
from deepspeed.module_inject.auto_ep_layer import (
    AutoEPMoELayer,
    RouterOutput,
    _AllToAllV,
    apply_scores_before_experts_if_enabled,
    combine_from_routed,
    permute_by_local_expert,
    unpermute_by_local_expert,
)

from . import ops
from .comm import SITE_LAYER, Fingerprint, dtype_code, failure_code, gather_step, raise_failures
from .compat import check_transformers_for_autoep
from .config import ReplicationConfig, ReplicationConfigError
from .grouped_experts import ExpertSlice, expert_slices, replica_weights
from .placement import Placement
from .policy import Decision
from .predictor import AHEAD, PREDICTORS
from .replicas import ExpertLayout
from .split import transport_rank
from .stage import ReplicationStage, StepState

__all__ = ["ReplicatedAutoEPLayer", "configure_autoep_layers"]


def _return_rows(y_MH: torch.Tensor, recv_W: List[int], send_W: List[int], code: int, group):
    """AutoEP's reverse all-to-all with one status row in front of each rank's rows, so that a
    rank whose experts failed still completes the exchange and every rank learns of it.

    Returns:
        ([N, H] rows back in send order, every rank's status code).
    """
    status = y_MH.new_full((1, y_MH.shape[1]), float(code))
    chunks = torch.split(y_MH, recv_W)
    back = _AllToAllV.apply(group, torch.cat([t for c in chunks for t in (status, c)]),
                            [n + 1 for n in recv_W], [n + 1 for n in send_W])
    heads = np.cumsum([0] + [n + 1 for n in send_W[:-1]])
    codes_W = [int(c) for c in back[torch.from_numpy(heads).to(back.device), 0].round().tolist()]
    keep = torch.ones(back.shape[0], dtype=torch.bool, device=back.device)
    keep[torch.from_numpy(heads).to(back.device)] = False
    return back[keep], codes_W


class ReplicatedAutoEPLayer(ReplicationStage, AutoEPMoELayer):
    """``AutoEPMoELayer`` whose split sends hot experts' routes to replicas on other ranks."""

    @classmethod
    def adopt(cls, layer: AutoEPMoELayer, replication: ReplicationConfig, uid: int = 0) -> "ReplicatedAutoEPLayer":
        """Make an AutoEP layer replicating, in place (already adopted: re-configure it).

        NOTE: the class of the existing object is switched instead of building a new module, so
        that every parameter, buffer, hook and the engine's references (optimizer, ZeRO
        partitions, gradient hooks) stay exactly those AutoEP made; no state is added to
        ``state_dict``.

        Args:
            layer: an ``AutoEPMoELayer`` (after ``deepspeed.initialize``: its group is set).
            replication: the ``moe_replication`` section. uid: position among the model's
                replicated layers (point-to-point tags).
        """
        if not isinstance(layer, cls):
            if layer.comm_backend != COMM_BACKEND:
                raise ReplicationConfigError(f"moe_replication needs expert_parallel.comm_backend={COMM_BACKEND!r}, "
                                             f"got {layer.comm_backend!r}")
            if layer.folding_group_handles is not None and layer.folding_group_handles.spec.tp_size > 1:
                raise ReplicationConfigError("moe_replication does not support AutoEP with folded tensor parallelism")
            layer.__class__ = cls
            layer.chain = None
            layer._init_stage(replication)
        else:
            layer.configure(replication)
        layer.uid = uid
        return layer

    # ------------------------------------------------------------------------ configuration and state

    def configure(self, replication: ReplicationConfig) -> None:
        """Switch config; replica state starts over from the home placement on the next step."""
        if replication.enabled and PREDICTORS[replication.predictor].source == AHEAD:
            usable = sorted(name for name, cls in PREDICTORS.items() if cls.source != AHEAD)
            raise ReplicationConfigError(f"moe_replication.predictor {replication.predictor!r} predicts from an "
                                         f"earlier layer, which AutoEP layers do not link yet; use one of {usable}")
        super().configure(replication)

    @property
    def home_experts(self) -> List[ExpertSlice]:
        return expert_slices(self.experts)

    # ------------------------------------------------------------------------ the data path

    def _forward(self, hidden_states: torch.Tensor):
        if not self.replication.enabled or self.ep_size == 1:
            self._agree_replication_off(hidden_states)
            return super()._forward(hidden_states)
        bsz, seqlen, hdim = hidden_states.shape
        x_TH = hidden_states.reshape(-1, hdim)
        group, rank, k = self.ep_group, self.ep_rank, self.top_k
        policy = self.policy
        grad = self.grad_step()
        store = self.store if (policy.enabled and not grad) else None
        step = StepState()

        # 1. route and count locally; one all-gather shares counts, errors, landing flags, weights
        # versions and the step's fingerprint (it replaces AutoEP's all-to-all of the counts).
        ro = None
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=x_TH.device)
        try:
            if x_TH.dtype != self.experts.w1.dtype:
                raise ValueError(f"hidden_states have dtype {x_TH.dtype}, the experts' weights {self.experts.w1.dtype}")
            ro = RouterOutput(*self.router(x_TH, self.expert_bias))
            counts_E = ro.num_tokens_per_expert.to(torch.int64)
            with torch.no_grad():
                self.tokens_per_expert.add_(ro.num_tokens_per_expert)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank by gather_step
            step.fail(err, "bad input")
        fingerprint = Fingerprint(SITE_LAYER, self.config_hash, policy.active.version, policy.active.digest(),
                                  int(grad) + 2 * int(self.training) + 4 * int(x_TH.requires_grad),
                                  dtype_code(x_TH.dtype), 0)
        landed = True
        try:
            landed = store is None or store.poll()
        except Exception as err:  # noqa: BLE001 - a transfer over its time limit: every rank raises
            step.fail(err, "replica transfer")
        g = gather_step(counts_E, fingerprint, group, tokens=x_TH.shape[0], error=step.error, where=step.where,
                        landed=landed, version=self.weights_version(), buffer=self.gather_buffer)
        global_E = g.total_E

        # 2. decide which placement serves.
        decision = Decision(policy.active)
        try:
            decision = self._decide(global_E, g, store, grad, step)
        except Exception as err:  # noqa: BLE001 - reported to every rank with the returned rows
            step.fail(err, "replication policy")
        placement = decision.placement

        # 3. the split plan: each expert's routes among its copies (the same integers on every rank).
        C = placement.slots_per_rank_total
        split = transport_rank(g.counts_WE, placement, rank, self.replication.prefer_local, total_E=global_E,
                               counts_ptr=g.counts_ptr)
        send_W = split.send_P.reshape(placement.ep_size, C).sum(axis=1).tolist()
        mine_WC = split.recv_WC
        recv_W = mine_WC.sum(axis=1).tolist()

        # 4. with gradients, the copies' weights travel with the step (overlapping the dispatch).
        fetched, anchor_out = None, None
        if grad and placement.num_replicas and step.error is None:
            fetched, x_TH, anchor_out = self._travel(x_TH, placement, rank, group, step)

        # 5. routes in send order (by physical slot, route order within a slot), AutoEP's all-to-all.
        order_N = torch.zeros(sum(send_W), dtype=torch.int64, device=x_TH.device)
        routed_NH = x_TH.new_zeros((sum(send_W), hdim))
        if step.error is None:
            try:
                send_P = torch.from_numpy(split.send_P).to(x_TH.device)
                copies_ER = torch.from_numpy(placement.log2phy_ER.copy()).to(x_TH.device)
                _, _, order_N = ops.assign_slots(ro.selected_experts.to(torch.int64), send_P, copies_ER,
                                                 kernels="torch")
                if order_N.numel() != sum(send_W):
                    raise RuntimeError(f"routes ({order_N.numel()}) disagree with the split ({sum(send_W)} rows)")
                routed_NH = apply_scores_before_experts_if_enabled(x_TH[order_N // k], ro.top_scores.reshape(-1)[order_N],
                                                                   score_apply=self.score_apply)
            except Exception as err:  # noqa: BLE001 - the agreed sizes are still exchanged
                step.fail(err, "expert computation")
        rows_MH = _AllToAllV.apply(group, routed_NH, send_W, recv_W)

        # 6. AutoEP's grouped experts over home and replica slots.
        y_MH = torch.zeros_like(rows_MH)
        if step.error is None:
            try:
                y_MH = self._run_slots(rows_MH, mine_WC, placement, fetched, step)
            except Exception as err:  # noqa: BLE001 - reported to every rank with the returned rows
                step.fail(err, "expert computation")

        # 7. close the step: the next plan's copies start moving (no gradients), stats, hooks.
        try:
            after = policy.close(global_E, placement, grad)
            if after is not None:
                self._move(after, g.version_W, step)
        except Exception as err:  # noqa: BLE001 - reported to every rank with the returned rows
            step.fail(err, "replica transfer")
        stats = self._stats(decision, global_E, split, step, grad)
        if step.error is None:
            try:
                self._publish_stats(stats)
            except Exception as err:  # noqa: BLE001 - reported to every rank with the returned rows
                step.fail(err, "stats hook")

        # 8. rows back with every rank's status (all ranks raise together), AutoEP's combine.
        code = failure_code(step.error, step.where) if step.error is not None else 0
        y_NH, codes_W = _return_rows(y_MH, recv_W, send_W, code, group)
        if any(codes_W):
            self._start_over()
        raise_failures(codes_W, step.error, rank)
        output = combine_from_routed(y_NH, top_scores=ro.top_scores, token_indices_sorted=order_N, top_k=k,
                                     score_apply=self.score_apply,
                                     combine_impl="legacy_bmm" if self.combine_impl == "legacy_bmm" else "weighted_sum",
                                     shape=(bsz, seqlen, hdim))
        if anchor_out is not None:
            output = output + anchor_out
        return self._finalize_output(output, x_TH, hidden_states, hdim)

    # ------------------------------------------------------------------------ steps of the data path

    def _run_slots(self, rows_MH: torch.Tensor, mine_WC: np.ndarray, placement: Placement, fetched, step: StepState):
        """AutoEP's expert step over this rank's C slots (rows grouped by slot as AutoEP groups
        them by expert): home slots on the home weights, replica slots on their copies' weights;
        without replica rows here, exactly AutoEP's call on the home experts."""
        e_loc, S = placement.experts_per_rank, placement.slots_per_rank
        with_replicas = bool(mine_WC[:, e_loc:].sum())
        counts_WC = torch.from_numpy(np.ascontiguousarray(mine_WC if with_replicas else mine_WC[:, :e_loc]))
        rows, perm, aligned_C, n = permute_by_local_expert(rows_MH, counts_WC.to(torch.int32).to(rows_MH.device))
        if not with_replicas:
            return unpermute_by_local_expert(self.experts(rows, aligned_C), perm, n)
        layout = ExpertLayout(ExpertSlice(self.experts, 0))
        if fetched is None:
            weights = replica_weights(layout, self.store.buffers, range(S), S, self.experts.w1.dtype)
        else:
            spec, buf_QN, _ = fetched
            if spec.reqs:
                spec.wait()
                step.waited_ms += spec.waited_ms
            weights = replica_weights(layout, buf_QN, [t.slot for t in spec.received], S, self.experts.w1.dtype)
        # NOTE: two grouped calls instead of one over concatenated weights: concatenating would
        # copy every home expert's weights at every step.
        cut = int(aligned_C[:e_loc].sum())
        out = torch.cat([self.experts(rows[:cut], aligned_C[:e_loc]),
                         torch.func.functional_call(self.experts, weights, (rows[cut:], aligned_C[e_loc:]))])
        return unpermute_by_local_expert(out, perm, n)

def configure_autoep_layers(model: torch.nn.Module, config: ReplicationConfig, first_uid: int = 0) -> int:
    """Apply ``config`` to every AutoEP layer of ``model`` (``configure_replication`` calls it).

    Stock layers are adopted only when the section is enabled (a model that never enables
    replication keeps AutoEP's own forward); adopted ones are re-configured either way.

    Returns:
        The number of layers configured.
    """
    layers = [m for m in model.modules() if isinstance(m, AutoEPMoELayer)]
    todo = [m for m in layers if config.enabled or isinstance(m, ReplicatedAutoEPLayer)]
    if todo and config.enabled:
        check_transformers_for_autoep()
    for i, layer in enumerate(todo):
        ReplicatedAutoEPLayer.adopt(layer, config, uid=first_uid + i)
    return len(todo)
