"""``ReplicatedMoE``: DeepSpeed's ``MoE`` with lossless predictive expert replication.

The subclass stays thin: it swaps the inner ``MOELayer`` for ``ReplicatedMOELayer`` (same
``gate`` and ``experts`` submodules, so ``state_dict`` keys are unchanged), whose forward is the
data path of docs/design.md ("One step"): gate -> gather -> decide -> split -> dispatch ->
experts -> stats -> combine. Decisions come from the layer's ``ReplicationPolicy``; copies move
through the ``ReplicaStore`` (steps without gradients) or travel with the step (``fetch.py``,
steps with gradients: training, and any forward under autograd). Replication off, the stock
``MOELayer.forward`` runs unchanged.

Legend: T tokens on this rank, H hidden, K routes per token, E logical experts, W ranks,
C slots per rank (E_loc + S), P = W * C, M rows received by this rank.
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Union

import numpy as np
import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer
from torch import nn

from .comm import (
    SITE_LAYER,
    Fingerprint,
    dtype_code,
    failure_code,
    gather_step,
    group_rank,
    group_size,
    raise_failures,
)
from .config import ReplicationConfig, ReplicationConfigError
from .dispatch import combine, dispatch
from .gating import Routes, capacity_per_expert, count_routes, drop_over_capacity, normalized_weight_TK, route
from .hooks import RemovableHandle, StepStats
from .lookahead import Chain, attach_entry
from .placement import Placement
from .policy import Decision
from .predictor import AHEAD, PREDICTORS
from .split import RankSplit, capacity_transport, transport_rank
from .stage import ReplicationStage, StepState

__all__ = ["ReplicatedMoE", "ReplicatedMOELayer", "configure_replication"]

ReplicationArg = Union[ReplicationConfig, Mapping[str, Any], None]


class ReplicatedMOELayer(ReplicationStage, MOELayer):
    """``MOELayer`` whose forward splits hot experts' tokens among replicas."""

    def __init__(self, stock: MOELayer, num_experts: int, replication: ReplicationConfig) -> None:
        super().__init__(stock.gate, stock.experts, stock.ep_group_name, stock.ep_size, stock.num_local_experts,
                         use_tutel=stock.use_tutel)
        self.num_experts = num_experts
        self.chain: Optional[Chain] = None
        self._init_stage(replication)

    # ------------------------------------------------------------------------ configuration and state

    @property
    def home_experts(self) -> List[nn.Module]:
        return list(self.experts.deepspeed_experts)

    # ------------------------------------------------------------------------ lookahead node

    @property
    def hidden_size(self) -> int:
        return self.gate.wg.weight.shape[1]

    @property
    def wants_ahead(self) -> bool:
        return self.replication.enabled and self.policy.enabled and self.policy.predictor.source == AHEAD

    def offer_ahead(self, predicted_E: np.ndarray, version_W: np.ndarray, grad: bool) -> None:
        """This batch's loads, predicted before the layer runs: prefetch for them now."""
        policy = self.policy
        if not grad and policy.pending is not None:
            # The previous prefetch missed its step; every rank finishes it here, at the same point
            # (the policy advances alike on every rank even if this rank's wait fails).
            try:
                self.store.land()
            finally:
                self.table.commit()
                policy.land_pending()
        new = policy.offer(predicted_E, grad)
        if new is not None:
            self._move(new, version_W)

    def install(self, placement: Placement) -> None:
        """Make ``placement`` serve from the next step, its copies moved and waited for now (a
        static plan, EPLB practice). Call on every rank at the same point, between steps."""
        if not self.policy.enabled:
            return
        group = self._group()
        version_W = np.zeros(self.ep_size, dtype=np.int64)
        version = torch.tensor([self.weights_version()], dtype=torch.int64,
                               device=next(self.home_experts[0].parameters()).device)
        if self.ep_size > 1:
            parts = torch.empty(self.ep_size, dtype=torch.int64, device=version.device)
            torch.distributed.all_gather_into_tensor(parts, version, group=group)
            version_W = parts.cpu().numpy()
        if self.store.in_flight:
            self.store.land()
            self.table.commit()
        self.policy.land_pending()
        self.policy.pending = placement
        self._move(placement, version_W)
        self.store.land()
        self.table.commit()
        self.policy.land_pending()

    def _links(self) -> int:
        if self.chain is None:
            return 0
        nxt = self.chain.next_of(self)
        return (0 if nxt is None else nxt.num_experts) + ((1 << 20) if self.policy.driven else 0)

    # ------------------------------------------------------------------------ the data path

    def forward(self, *input: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if not self.replication.enabled:
            self._agree_replication_off(input[0])
            return super().forward(*input, **kwargs)
        return self._replicated_forward(input[0], input[1] if len(input) > 1 else None)

    def _replicated_forward(self, x: torch.Tensor, used_token: Optional[torch.Tensor]) -> torch.Tensor:
        group = self._group()
        rank, E, k = group_rank(group), self.num_experts, self.gate.k
        cfg, policy = self.replication, self.policy
        if self.chain is not None:
            self.chain.link(self)
        grad = self.grad_step()
        store = self.store if (policy.enabled and not grad) else None
        step = StepState()

        # 1. gate and count locally (and the loads of the layer this one predicts); one all-gather
        # shares counts, errors, landing flags, weights versions and the step's fingerprint.
        x_TH = routes = ahead_E = None
        counts_E = np.zeros(E, dtype=np.int64) if x.is_cpu else torch.zeros(E, dtype=torch.int64, device=x.device)
        try:
            x_TH, routes, counts_E = self._gate(x, used_token, grad)
            step.where = "replication policy"
            ahead_E = self.chain.ahead_counts(self, x_TH) if self.chain is not None else None
        except Exception as err:  # noqa: BLE001 - re-raised on every rank by gather_step
            step.fail(err, step.where)
        nxt = self.chain.next_of(self) if self.chain is not None else None
        fingerprint = Fingerprint(SITE_LAYER, self.config_hash, policy.active.version, policy.active.digest(),
                                  int(grad) + 2 * int(self.training) + 4 * int(x.requires_grad), dtype_code(x.dtype),
                                  self._links())
        landed = True
        try:
            # NOTE: asked as late as possible, so that transfers have the gate's time to finish too.
            landed = store is None or store.poll()
        except Exception as err:  # noqa: BLE001 - a transfer over its time limit: every rank raises
            step.fail(err, "replica transfer")
        g = gather_step(counts_E, fingerprint, group, tokens=0 if x_TH is None else x_TH.shape[0],
                        error=step.error, where=step.where, landed=landed, version=self.weights_version(),
                        ahead_E=ahead_E, ahead_version=0 if nxt is None else nxt.weights_version(),
                        buffer=self.gather_buffer)
        global_E = g.total_E

        # 2. decide which placement serves; move copies the decision asks for now.
        decision = Decision(policy.active)
        try:
            decision = self._decide(global_E, g, store, grad, step)
            if nxt is not None and nxt.wants_ahead:
                nxt.offer_ahead(g.ahead_total_E, g.ahead_version_W, grad)
        except Exception as err:  # noqa: BLE001 - reported to every rank through combine
            step.fail(err, "replica transfer" if isinstance(err, TimeoutError) else "replication policy")
        placement = decision.placement

        # 3. split each expert's tokens among its copies (the same integers on every rank).
        split = self._split(g, placement, rank)
        expert_TK = routes.expert_TK
        if not cfg.dropless:
            keep_E = np.bincount(np.maximum(placement.phy2log_P, 0), weights=split.send_P, minlength=E)
            expert_TK = drop_over_capacity(expert_TK, torch.from_numpy(keep_E.astype(np.int64)).to(x.device))
        weight_TK = normalized_weight_TK(Routes(expert_TK, routes.weight_TK, routes.l_aux, routes.exp_counts_E), k)

        # 4. with gradients, the copies' weights travel with the step (overlapping the dispatch).
        fetched, anchor_out = None, None
        if grad and placement.num_replicas and step.error is None:
            fetched, x_TH, anchor_out = self._travel(x_TH, placement, rank, group, step)

        # 5-6. dispatch; experts over home and replica slots.
        rows_MH, meta = dispatch(x_TH, expert_TK, split, placement, group, kernels=self._kernels(grad))
        if meta.error is not None:
            step.fail(meta.error, "expert computation")
        y_MH = torch.zeros_like(rows_MH)
        if step.error is None:
            try:
                y_MH = self._run_slots(rows_MH, meta.slot_rows_C, placement, fetched, step)
            except Exception as err:  # noqa: BLE001 - reported to every rank through combine
                step.fail(err, "expert computation")

        # 7. close the step: next plan's copies start moving (no gradients), stats, hooks.
        try:
            after = policy.close(global_E, placement, grad)
            if after is not None:
                self._move(after, g.version_W, step)
        except Exception as err:  # noqa: BLE001 - reported to every rank through combine
            step.fail(err, "replica transfer")
        stats = self._stats(decision, global_E, split, step, grad)
        if step.error is None:
            try:
                self._publish_stats(stats)
            except Exception as err:  # noqa: BLE001 - reported to every rank through combine
                step.fail(err, "stats hook")

        # 8. combine; its exchange carries every rank's status, so all ranks raise together.
        code = failure_code(step.error, step.where) if step.error is not None else 0
        out_TH, codes_W = combine(y_MH, weight_TK, meta, group, failed=code, kernels=self._kernels(grad))
        if any(codes_W):
            self._start_over()
        raise_failures(codes_W, step.error, rank)
        self.runs += 1
        self.l_aux, self.exp_counts = routes.l_aux, routes.exp_counts_E
        if anchor_out is not None:
            out_TH = out_TH + anchor_out
        return out_TH.reshape(x.shape)

    # ------------------------------------------------------------------------ steps of the data path

    def _group(self):
        group = self.ep_group
        if self.ep_size > 1 and group is None:
            raise RuntimeError("ReplicatedMoE has no expert-parallel group: call deepspeed.initialize(...) or "
                               "layer.set_deepspeed_parallelism() before the first forward")
        if group_size(group) != self.ep_size:
            raise RuntimeError(f"expert-parallel group has {group_size(group)} ranks, the layer expects "
                               f"ep_size={self.ep_size}")
        return group

    def _kernels(self, grad: bool) -> str:
        # NOTE: the Triton kernels have no backward; steps with gradients use the PyTorch twins.
        return "torch" if grad else self.replication.kernels

    def _gate(self, x: torch.Tensor, used_token: Optional[torch.Tensor], grad: bool):
        H = self.hidden_size
        if x.dim() < 1 or x.shape[-1] != H:
            raise ValueError(f"hidden_states must end in hidden_size={H}, got shape {tuple(x.shape)}")
        param = self.gate.wg.weight
        if x.device != param.device:
            raise ValueError(f"hidden_states are on {x.device}, the layer's weights on {param.device}")
        expert_dtype = next(self.home_experts[0].parameters()).dtype
        if x.dtype != expert_dtype:
            raise ValueError(f"hidden_states have dtype {x.dtype}, the experts' weights {expert_dtype}")
        if grad and self.training and self.gate.noisy_gate_policy is not None:
            raise ValueError(f"noisy_gate_policy={self.gate.noisy_gate_policy!r} adds random noise in training, "
                             "which the replicated path does not reproduce; use noisy_gate_policy=None")
        x_TH = x.reshape(-1, H)
        if used_token is not None and used_token.numel() != x_TH.shape[0]:
            raise ValueError(f"used_token has {used_token.numel()} entries for {x_TH.shape[0]} tokens")
        routes = route(self.gate, x_TH, None if used_token is None else used_token.reshape(-1),
                       kernels=self._kernels(grad))
        return x_TH, routes, count_routes(routes.expert_TK, self.num_experts)

    def _split(self, g, placement: Placement, rank: int) -> RankSplit:
        cfg = self.replication
        if cfg.dropless:
            return transport_rank(g.counts_WE, placement, rank, cfg.prefer_local, total_E=g.total_E,
                                  counts_ptr=g.counts_ptr)
        counts_WE = g.counts_WE
        capacity_W = capacity_per_expert(g.tokens_W, self.num_experts, self.gate.k,
                                         self.gate.capacity_factor if self.training else self.gate.eval_capacity_factor,
                                         self.gate.min_capacity)
        return RankSplit.of_dense(capacity_transport(counts_WE, capacity_W, placement, cfg.prefer_local), rank,
                                  placement.slots_per_rank_total)

    def _run_slots(self, rows_MH: torch.Tensor, slot_rows_C, placement: Placement, fetched, step: StepState):
        """Every home expert on its rows (also on none, so that each gets a gradient, as in the
        stock layer), then each replica slot on its rows."""
        e_loc = placement.experts_per_rank
        outs, start = [], 0
        experts = self.home_experts
        for j, n in enumerate(slot_rows_C):
            chunk = rows_MH[start:start + n]
            start += n
            if j < e_loc:
                y = experts[j](chunk)
            elif n == 0:
                continue
            else:
                y = self._run_replica(j - e_loc, chunk, placement, fetched, step)
            outs.append(y[0] if isinstance(y, tuple) else y)
        return torch.cat(outs) if outs else torch.zeros_like(rows_MH)

    def _run_replica(self, slot: int, chunk: torch.Tensor, placement: Placement, fetched, step: StepState):
        template = self.home_experts[0]
        if fetched is None:
            params = self.store.params(slot)
        else:
            spec, buf_QN, layout = fetched
            if spec.reqs:
                spec.wait()
                step.waited_ms += spec.waited_ms
            row = [t.slot for t in spec.received].index(slot)
            params = layout.named(buf_QN[row])
        return torch.func.functional_call(template, params, (chunk,))


class ReplicatedMoE(MoE):
    """``deepspeed.moe.layer.MoE`` that replicates hot experts onto under-loaded ranks.

    Takes every ``MoE`` argument, plus ``replication``: a ``ReplicationConfig``, the
    ``"moe_replication"`` dict, or None (replication off, the stock layer's behaviour). The
    outputs and gradients are those of the stock layer run dropless: replication changes where a
    token is computed, never which expert computes it. It acts in training and in inference.

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
        """Call ``fn(stats)`` after every replicated forward; returns a handle with ``remove()``.
        An exception in ``fn`` is raised as ``ReplicationError`` on every rank of the group."""
        return self.deepspeed_moe.hooks.register(fn)


def configure_replication(model_or_engine: nn.Module, ds_config: Union[str, Mapping[str, Any], None] = None, *,
                          require_layers: bool = True) -> int:
    """Apply the ``"moe_replication"`` section to every replicable layer of a model: each
    ``ReplicatedMoE``, and each DeepSpeed AutoEP ``AutoEPMoELayer`` (made a
    ``ReplicatedAutoEPLayer`` in place, ``autoep.py``; left stock while the section is off).

    Args:
        model_or_engine: a ``DeepSpeedEngine`` (its ``config`` is read when ``ds_config`` is None)
            or any module.
        ds_config: a DeepSpeed config path or dict; overrides the engine's.
        require_layers: an enabled section on a model without replicable layers is an error
            (``ds_moe_replicate.initialize`` passes False and warns at the first forward instead).

    Returns:
        The number of layers configured. Call on every rank, between steps, any number of
        times. The model's layers share one lookahead chain; with an AHEAD predictor a forward
        hook on the model's input embeddings predicts the first MoE layer's loads.

    Raises:
        ReplicationConfigError: the section is enabled and the model has no replicable layer
            (replication would silently do nothing).
    """
    if ds_config is None:
        ds_config = getattr(model_or_engine, "config", None)
        if not isinstance(ds_config, Mapping):
            raise ValueError("pass ds_config, or a DeepSpeed engine whose .config holds the DeepSpeed config dict")
    config = ReplicationConfig.from_ds_config(ds_config)
    layers = [m for m in model_or_engine.modules() if isinstance(m, ReplicatedMoE)]
    distiller = None
    if config.enabled and PREDICTORS[config.predictor].needs_file:
        from .learned import RouterDistiller

        distiller = RouterDistiller.load(config.learned_path)
    chain = Chain(distiller)
    for i, layer in enumerate(layers):
        layer.configure(config)
        layer.deepspeed_moe.chain = chain
        layer.deepspeed_moe.uid = i
    if layers and config.enabled and layers[0].deepspeed_moe.wants_ahead:
        hook = attach_entry(model_or_engine, chain)
        if hook is None and distiller is not None:
            raise ValueError("moe_replication.predictor 'learned' predicts from the input embeddings, and this model "
                             "has no get_input_embeddings() nor nn.Embedding")
    # NOTE: imported here so that the legacy layer never loads AutoEP's modules itself.
    from .autoep import configure_autoep_layers

    total = len(layers) + configure_autoep_layers(model_or_engine, config, first_uid=len(layers))
    if require_layers and config.enabled and total == 0:
        raise ReplicationConfigError(
            f"moe_replication is enabled but {type(model_or_engine).__name__} has no replicable MoE layer (a "
            "ReplicatedMoE, or an AutoEPMoELayer made by an 'expert_parallel' section in deepspeed.initialize): "
            "replication would do nothing; set moe_replication.enabled to false or build the model with such layers")
    return total
