"""``ReplicatedMoE``: DeepSpeed's ``MoE`` with lossless predictive expert replication.

The subclass stays thin: it swaps the inner ``MOELayer`` for ``ReplicatedMOELayer`` (same
``gate`` and ``experts`` submodules, so ``state_dict`` keys are unchanged) and wires the steps
of one forward (DESIGN.md): gate -> count + all-gather -> split -> dispatch -> experts -> combine,
with observe/plan/prefetch in between. Replication off, or in training mode, the stock
``MOELayer.forward`` runs unchanged.

Legend: T tokens on this rank, H hidden, K routes per token, E logical experts, W ranks,
C slots per rank (E_loc + S).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer
from torch import nn

from . import lookahead
from .comm import ReplicationError, gather_step, group_rank, group_size
from .config import ReplicationConfig
from .controller import ReplicationController
from .dispatch import combine, dispatch
from .split import capacity_transport, transport
from .placement import Placement
from .gating import Routes, drop_over_capacity, normalized_weight_TK, route
from .hooks import RemovableHandle, StatsHooks, StepStats
from .learned import RouterDistiller
from .planner import balancedness

__all__ = ["ReplicatedMoE", "ReplicatedMOELayer", "configure_replication"]

ReplicationArg = Union[ReplicationConfig, Mapping[str, Any], None]


def _capacity(tokens: np.ndarray, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> np.ndarray:
    """DeepSpeed's per-expert capacity of each rank: ceil(T / E * factor * k'), at least
    ``min_capacity`` (k' = 1 for top-1, else k, as top2gating and topkgating scale it)."""
    scale = capacity_factor * (1 if k == 1 else k)
    return np.maximum(np.ceil(tokens / num_experts * scale), min_capacity).astype(np.int64)


class ReplicatedMOELayer(MOELayer):
    """``MOELayer`` whose eval forward splits hot experts' tokens among replicas."""

    def __init__(self, stock: MOELayer, num_experts: int, replication: ReplicationConfig) -> None:
        super().__init__(stock.gate, stock.experts, stock.ep_group_name, stock.ep_size, stock.num_local_experts,
                         use_tutel=stock.use_tutel)
        self.num_experts = num_experts
        self.replication = replication
        self.hooks = StatsHooks()
        self.last_stats: Optional[StepStats] = None
        self._controller: Optional[ReplicationController] = None

    def configure(self, replication: ReplicationConfig) -> None:
        """Switch config; replica state starts over from the home placement on the next step."""
        self.replication = replication
        self._controller = None

    @property
    def controller(self) -> ReplicationController:
        if self._controller is None:
            template = self.experts.deepspeed_experts[0]
            self._controller = ReplicationController(self.replication, self.num_experts, self.ep_size, template)
            self._controller.driven = self.__dict__.get("_driven", False)
        return self._controller

    def mark_driven(self) -> None:
        """A previous layer (or the entry hook) predicts this layer's loads from now on."""
        self.__dict__["_driven"] = True
        self.controller.driven = True

    def forward(self, *input: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if not self.replication.enabled or self.training:
            return super().forward(*input, **kwargs)
        used_token = input[1] if len(input) > 1 else None
        return self._replicated_forward(input[0], used_token)

    # ------------------------------------------------------------------------ replicated path

    def _gate(self, x: torch.Tensor, used_token: Optional[torch.Tensor]):
        H = self.gate.wg.weight.shape[1]
        if x.dim() < 1 or x.shape[-1] != H:
            raise ValueError(f"hidden_states must end in hidden_size={H}, got shape {tuple(x.shape)}")
        x_TH = x.reshape(-1, H)
        if used_token is not None and used_token.numel() != x_TH.shape[0]:
            raise ValueError(f"used_token has {used_token.numel()} entries for {x_TH.shape[0]} tokens")
        routes = route(self.gate, x_TH, None if used_token is None else used_token.reshape(-1),
                       kernels=self.replication.kernels)
        taken = routes.expert_TK[routes.expert_TK >= 0]
        return x_TH, routes, torch.bincount(taken, minlength=self.num_experts)

    def _run_slots(self, rows_MH: torch.Tensor, slot_rows_C, placement: Placement) -> torch.Tensor:
        e_loc = placement.experts_per_rank
        out = torch.empty_like(rows_MH)
        start = 0
        for j, n in enumerate(slot_rows_C):
            if n == 0:
                continue
            chunk = rows_MH[start:start + n]
            if j < e_loc:
                y = self.experts.deepspeed_experts[j](chunk)
                y = y[0] if isinstance(y, tuple) else y
            else:
                y = self.controller.store.run(j - e_loc, chunk)
            out[start:start + n] = y
            start += n
        return out

    # ------------------------------------------------------------------------ lookahead links

    @property
    def runs(self) -> int:
        return self.controller.step

    @property
    def hidden_size(self) -> int:
        return self.gate.wg.weight.shape[1]

    @property
    def next_layer(self) -> Optional["ReplicatedMOELayer"]:
        ref = self.__dict__.get("_next_ref")
        return ref() if ref is not None else None

    def set_next(self, layer: "ReplicatedMOELayer") -> None:
        # NOTE: a weak reference kept outside nn.Module's registry (plain assignment of a module
        # would make the next layer a submodule, its parameters twice in state_dict).
        self.__dict__["_next_ref"] = weakref.ref(layer)

    def _replicated_forward(self, x: torch.Tensor, used_token: Optional[torch.Tensor]) -> torch.Tensor:
        group = self.ep_group
        if self.ep_size > 1 and group is None:
            raise RuntimeError("ReplicatedMoE has no expert-parallel group: call deepspeed.initialize(...) or "
                               "layer.set_deepspeed_parallelism() before the first forward")
        W, rank, E, k = self.ep_size, group_rank(group), self.num_experts, self.gate.k
        if group_size(group) != W:
            raise RuntimeError(f"expert-parallel group has {group_size(group)} ranks, the layer expects ep_size={W}")
        ctl = self.controller
        lookahead.link(self)
        ctl.begin_step(next(self.experts.parameters()))
        nxt = self.next_layer if lookahead.active(self.next_layer) else None

        # 1-2. gate and count locally (and the next layer's loads, if this layer looks ahead);
        # one all-gather shares counts, landing flags and errors.
        error, routes, x_TH = None, None, None
        counts_E = torch.zeros(E, dtype=torch.int64, device=x.device)
        ahead_E = None if nxt is None else torch.zeros(nxt.num_experts, dtype=torch.int64, device=x.device)
        try:
            x_TH, routes, counts_E = self._gate(x, used_token)
            if nxt is not None:
                ahead_E = lookahead.predict_counts(nxt, x_TH)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank by gather_step
            error = err
        # NOTE: asked as late as possible, so that transfers have the gate's time to finish too.
        landed = ctl.poll()
        g = gather_step(counts_E, 0 if x_TH is None else x_TH.shape[0], error, group, landed, ahead_E)
        counts_WE = g.counts_WE
        activated = ctl.settle(bool(g.landed_W.all()))
        late = ctl.late
        global_E = counts_WE.sum(axis=0)
        if self.replication.predictor == "oracle":
            activated = ctl.oracle(global_E, self.experts.deepspeed_experts, rank, group) or activated

        # 3. split among the copies of the active placement.
        placement = ctl.placement
        if self.replication.dropless:
            send_WP = transport(counts_WE, placement, self.replication.prefer_local)
            expert_TK = routes.expert_TK
        else:
            capacity_W = _capacity(g.tokens_W, E, k, self.gate.eval_capacity_factor, self.gate.min_capacity)
            send_WP = capacity_transport(counts_WE, capacity_W, placement, self.replication.prefer_local)
            # Routes this rank keeps per expert (empty slots send nothing, so they add 0 to expert 0).
            keep_E = np.bincount(np.maximum(placement.phy2log_P, 0), weights=send_WP[rank], minlength=E)
            expert_TK = drop_over_capacity(routes.expert_TK, torch.from_numpy(keep_E.astype(np.int64)).to(x.device))
        weight_TK = normalized_weight_TK(Routes(expert_TK, routes.weight_TK, routes.l_aux, routes.exp_counts_E), k)

        # 7. observe; start prefetching replicas (this layer's next history plan, or the next
        # layer's lookahead plan): the transfers overlap the dispatch and expert compute below.
        ctl.observe(global_E, self.experts.deepspeed_experts, rank, group)
        if nxt is not None:
            nxt.controller.prefetch(g.lookahead_WE.sum(axis=0), nxt.experts.deepspeed_experts, rank, group)

        # 4-6. dispatch, experts over home and replica slots, combine.
        rows_MH, meta = dispatch(x_TH, expert_TK, send_WP, placement, rank, group, kernels=self.replication.kernels)
        expert_error = None
        try:
            y_MH = self._run_slots(rows_MH, meta.slot_rows_C, placement)
        except Exception as err:  # noqa: BLE001 - reported to every rank through combine
            expert_error, y_MH = err, torch.zeros_like(rows_MH)
        out_TH, failed = combine(y_MH, weight_TK, meta, group, failed=expert_error is not None,
                                 kernels=self.replication.kernels)
        traffic = ctl.end_step()
        if failed:
            if expert_error is not None:
                raise ReplicationError(f"expert computation failed on expert-parallel rank {rank}: {expert_error}") \
                    from expert_error
            raise ReplicationError(f"expert computation failed on expert-parallel rank(s) {failed}; rank {rank} "
                                   "stops too")

        self.l_aux, self.exp_counts = routes.l_aux, routes.exp_counts_E
        rank_tokens_W = torch.from_numpy(send_WP.reshape(-1, W, placement.slots_per_rank_total).sum(axis=(0, 2)))
        l1, recall = prediction_quality(ctl.prediction, global_E, W)
        stats = StepStats(
            step=ctl.step - 1,
            plan_version=placement.version,
            counts_E=torch.from_numpy(global_E),
            rank_tokens_W=rank_tokens_W,
            balancedness=float(balancedness(rank_tokens_W)),
            dropped_tokens=int(counts_WE.sum() - send_WP.sum()),
            num_replicas=placement.num_replicas,
            replanned=traffic.replanned,
            activated=activated,
            bytes_moved=traffic.bytes_moved,
            bytes_received=traffic.bytes_received,
            exposed_wait_ms=traffic.exposed_wait_ms,
            predictor=self.replication.predictor if ctl.driven or self.replication.predictor not in lookahead.AHEAD
            else "ema",
            predicted_E=None if ctl.prediction is None else torch.from_numpy(np.asarray(ctl.prediction)),
            prediction_l1=l1,
            hot_recall=recall,
            prefetch_late=late,
        )
        self.last_stats = stats
        self.hooks(stats)
        return out_TH.reshape(x.shape)


def prediction_quality(predicted_E: Optional[np.ndarray], actual_E: np.ndarray, ep_size: int):
    """(L1 distance between predicted and actual load shares, recall of the hot experts).

    Hot experts are those whose actual load exceeds a mean rank's load (the ones that need
    copies); recall is the fraction of them the prediction also puts above its mean rank load.
    Both are NaN without a prediction; recall is 1.0 when no expert is hot.
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


class ReplicatedMoE(MoE):
    """``deepspeed.moe.layer.MoE`` that replicates hot experts onto under-loaded ranks.

    Takes every ``MoE`` argument, plus ``replication``: a ``ReplicationConfig``, the
    ``"moe_replication"`` dict, or None (replication off, the stock layer's behaviour). The
    outputs are those of the stock layer run dropless: replication changes where a token is
    computed, never which expert computes it. Replication acts in eval mode; in training mode the
    stock forward runs.

    Returns ``(output, l_aux, exp_counts)`` like ``MoE``; ``last_stats`` holds the last
    replicated step's ``StepStats``.
    """

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1, k: int = 1,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True,
                 use_rts: bool = True, use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True, replication: ReplicationArg = None) -> None:
        if k < 1 or k > num_experts:
            raise ValueError(f"k must lie in [1, num_experts={num_experts}], got {k}")
        super().__init__(hidden_size, expert, num_experts, ep_size, k, capacity_factor, eval_capacity_factor,
                         min_capacity, use_residual, noisy_gate_policy, drop_tokens, use_rts, use_tutel,
                         enable_expert_tensor_parallelism, top2_2nd_expert_sampling)
        self.deepspeed_moe = ReplicatedMOELayer(self.deepspeed_moe, num_experts, ReplicationConfig.coerce(replication))

    @property
    def replication(self) -> ReplicationConfig:
        return self.deepspeed_moe.replication

    def configure(self, replication: ReplicationArg) -> None:
        """Apply a new ``moe_replication`` config. Call it on every rank at the same step."""
        self.deepspeed_moe.configure(ReplicationConfig.coerce(replication))

    @property
    def last_stats(self) -> Optional[StepStats]:
        return self.deepspeed_moe.last_stats

    def register_stats_hook(self, fn: Callable[[StepStats], None]) -> RemovableHandle:
        """Call ``fn(stats)`` after every replicated forward; returns a handle with ``remove()``."""
        return self.deepspeed_moe.hooks.register(fn)


def configure_replication(model_or_engine: nn.Module, ds_config: Union[str, Mapping[str, Any], None] = None) -> int:
    """Apply the ``"moe_replication"`` section to every ``ReplicatedMoE`` of a model.

    Args:
        model_or_engine: a ``DeepSpeedEngine`` (its ``config`` is read when ``ds_config`` is None)
            or any module.
        ds_config: a DeepSpeed config path or dict; overrides the engine's.

    Returns:
        The number of layers configured. Call on every rank, between steps. With the
        ``"lookahead"`` predictor a forward hook is attached (once) to the model's input
        embeddings, to predict the first MoE layer's loads.
    """
    if ds_config is None:
        ds_config = getattr(model_or_engine, "config", None)
        if not isinstance(ds_config, Mapping):
            raise ValueError("pass ds_config, or a DeepSpeed engine whose .config holds the DeepSpeed config dict")
    config = ReplicationConfig.from_ds_config(ds_config)
    layers = [m for m in model_or_engine.modules() if isinstance(m, ReplicatedMoE)]
    for layer in layers:
        layer.configure(config)
    if layers and config.enabled and config.predictor in lookahead.AHEAD:
        # "lookahead": the first MoE layer is predicted from the input embeddings, the others
        # from the layer before them; without an embedding module the first falls back to "ema".
        # "learned": every layer is predicted from the embeddings by the distilled predictor.
        distiller = RouterDistiller.load(config.learned_path) if config.predictor == "learned" else None
        hook = lookahead.attach_entry(model_or_engine, lambda first=layers[0]: first.deepspeed_moe, distiller)
        if hook is None and distiller is not None:
            raise ValueError("moe_replication.predictor 'learned' predicts from the input embeddings, and this model "
                             "has no get_input_embeddings() nor nn.Embedding")
    return len(layers)
