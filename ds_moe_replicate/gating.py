"""Gate step: the parent's ``TopKGate`` weights in, top-k expert ids and combine weights out.

Routing is the model's own: the same logits, the same choice and the same weights as DeepSpeed's
``top1gating`` / ``top2gating`` / ``topkgating`` (0.19.x) in dropless mode, kept per route
(token, j) instead of DeepSpeed's padded [E, C] layout so that a route can be sent to any copy of
its expert. The auxiliary loss and ``exp_counts`` are DeepSpeed's too.

Legend: T tokens on this rank, H hidden size, E logical experts, K routes per token (top-k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate, gumbel_rsample

from . import native, ops

__all__ = ["Routes", "route", "count_routes", "drop_over_capacity", "normalized_weight_TK", "capacity_per_expert"]


@dataclass(frozen=True)
class Routes:
    """Each token's K routes.

    Attributes:
        expert_TK: int64 logical expert of each route; -1 where the route is not taken (k = 1 with
            ``used_token`` = 0, or dropped over capacity).
        weight_TK: fp32 combine weight of each route (0 where not taken).
        l_aux: DeepSpeed's load-balancing loss (scalar).
        exp_counts_E: DeepSpeed's ``exp_counts`` (routes chosen per expert, before capacity).
    """

    expert_TK: torch.Tensor
    weight_TK: torch.Tensor
    l_aux: torch.Tensor
    exp_counts_E: torch.Tensor


def _logits(gate: TopKGate, x_TH: torch.Tensor) -> torch.Tensor:
    # NOTE: fp32 like DeepSpeed; the Jitter policy applies in training only, where the stock
    # path runs, so eval logits are deterministic.
    return F.linear(x_TH.float(), weight=gate.wg.weight.float(), bias=None)


def route(gate: TopKGate, x_TH: torch.Tensor, used_token_T: Optional[torch.Tensor] = None, *,
          kernels: str = "torch") -> Routes:
    """DeepSpeed's gating decision for every token, without capacity.

    Args:
        gate: the layer's ``TopKGate`` (its ``wg``, ``k`` and ``top2_2nd_expert_sampling``).
        x_TH: [T, H] tokens of this rank (T may be 0).
        used_token_T: optional [T] mask; as in DeepSpeed it only applies to k = 1.
        kernels: ``moe_replication.kernels`` (``"auto"``, ``"triton"`` or ``"torch"``): who runs
            the fused softmax + top-k + counts (``ops.topk_gating``).

    Returns:
        ``Routes`` with K = gate.k routes per token.
    """
    logits_TE = _logits(gate, x_TH)
    T, E = logits_TE.shape
    k = gate.k
    if k == 2 and gate.top2_2nd_expert_sampling:
        return _route_sampled_top2(logits_TE)
    # NOTE: the choice is on the logits (see kernels/topk_gating.py): DeepSpeed's, except where
    # fp32 rounding makes two different logits' probabilities equal.
    expert_TK, weight_TK, counts_E, gate_sum_E = ops.topk_gating(logits_TE, k, kernels=kernels)
    me_E = gate_sum_E / T if T else gate_sum_E
    if k == 1:
        if used_token_T is not None:
            mask_TE = torch.einsum("s,se->se", used_token_T, F.one_hot(expert_TK[:, 0], num_classes=E))
            counts_E = mask_TE.sum(dim=0).detach()
            ce_E = mask_TE.float().mean(dim=0) if T else me_E
            taken_T = mask_TE.sum(dim=1) > 0
            weight_TK = weight_TK * used_token_T.unsqueeze(1)
            expert_TK = torch.where(taken_T.unsqueeze(1), expert_TK, torch.full_like(expert_TK, -1))
        else:
            ce_E = counts_E.float() / T if T else me_E
        return Routes(expert_TK, weight_TK, torch.sum(me_E * ce_E) * E, counts_E)
    if k == 2:
        # DeepSpeed's ce for top-2 counts first choices only.
        ce_E = torch.bincount(expert_TK[:, 0], minlength=E).float() / T if T else me_E
        return Routes(expert_TK, weight_TK, torch.mean(me_E * ce_E) * E * E, counts_E)
    ce_E = counts_E.float() / T if T else me_E
    return Routes(expert_TK, weight_TK, torch.mean(me_E * ce_E) * E * E / k, counts_E)


def _route_sampled_top2(logits_TE: torch.Tensor) -> Routes:
    """k = 2 with ``top2_2nd_expert_sampling``: DeepSpeed's Gumbel-sampled second expert (PyTorch
    only: the sample is random, so no kernel could be checked against it)."""
    gates_TE = F.softmax(logits_TE, dim=1)
    T, E = gates_TE.shape
    me_E = gates_TE.mean(dim=0) if T else gates_TE.new_zeros(E)
    idx1_T = torch.argmax(gates_TE, dim=1)
    mask1_TE = F.one_hot(idx1_T, num_classes=E)
    logits_TE = logits_TE + gumbel_rsample(logits_TE.shape, device=logits_TE.device)
    idx2_T = torch.argmax(logits_TE.masked_fill(mask1_TE.bool(), float("-inf")), dim=1)
    mask2_TE = F.one_hot(idx2_T, num_classes=E)
    ce_E = mask1_TE.float().mean(dim=0) if T else me_E
    l_aux = torch.mean(me_E * ce_E) * E * E
    exp_counts = (mask1_TE + mask2_TE).sum(dim=0).detach()
    expert_TK = torch.stack([idx1_T, idx2_T], dim=1)
    return Routes(expert_TK, gates_TE.gather(1, expert_TK), l_aux, exp_counts)


def normalized_weight_TK(routes: Routes, k: int) -> torch.Tensor:
    """Combine weights as DeepSpeed applies them: raw gate for k = 1, renormalised over the
    taken routes of each token for k >= 2 (clamped at fp32 eps, as DeepSpeed does)."""
    if k == 1:
        return routes.weight_TK
    w = torch.where(routes.expert_TK >= 0, routes.weight_TK, torch.zeros_like(routes.weight_TK))
    denom_T = torch.clamp(w.sum(dim=1, keepdim=True), min=torch.finfo(w.dtype).eps)
    return w / denom_T


def capacity_per_expert(tokens, num_experts: int, k: int, capacity_factor: float, min_capacity: int):
    """DeepSpeed's per-expert capacity for ``tokens`` tokens on a rank (the one copy of the
    formula in this package): ceil(T / E * factor * k'), at least ``min_capacity``, where k' = 1
    for top-1 and k otherwise (as ``top1gating``/``top2gating``/``topkgating`` scale it).

    Args:
        tokens: an int or an int array of token counts (e.g. [W], one per rank).

    Returns:
        int64 NumPy array shaped like ``tokens``.
    """
    scale = capacity_factor * (1 if k == 1 else k)
    return np.maximum(np.ceil(np.asarray(tokens, dtype=np.float64) / num_experts * scale),
                      min_capacity).astype(np.int64)


def count_routes(expert_TK: torch.Tensor, num_experts: int):
    """int64 [E] taken routes per expert (-1 entries are routes not taken): a NumPy array on the
    host, a tensor on a device (what ``comm.gather_step`` sends either way).

    On the host the compiled count (``native.count``: a few microseconds where ``torch.bincount``
    takes fifteen), into a NumPy array (the all-gather's payload is built in NumPy there; crossing
    from a tensor costs microseconds of its own); on a device ``torch.bincount``, shifted by one
    instead of masked (a boolean mask costs a device-to-host sync). docs/control_path.md."""
    if expert_TK.is_cpu and expert_TK.dtype == torch.int64 and expert_TK.is_contiguous():
        out = np.empty(num_experts, dtype=np.int64)
        if native.count_into(expert_TK.data_ptr(), expert_TK.numel(), num_experts, native.address(out)):
            return out
    counts = torch.bincount(expert_TK.reshape(-1) + 1, minlength=num_experts + 1)[1:]
    return counts.numpy() if counts.is_cpu else counts


def drop_over_capacity(expert_TK: torch.Tensor, keep_E: torch.Tensor) -> torch.Tensor:
    """Mark routes beyond each expert's kept count as not taken (-1), in route order.

    Position policy: the first ``keep_E[e]`` routes to expert e (token order, then k) are kept.

    Args:
        expert_TK: int64 routes (-1 = not taken). keep_E: int64 routes to keep per expert.

    Returns:
        expert_TK with the overflow set to -1.
    """
    flat = expert_TK.reshape(-1)
    taken = flat >= 0
    e = flat.clamp_min(0)
    onehot = F.one_hot(e, num_classes=keep_E.numel()) * taken.unsqueeze(1)
    position = (onehot.cumsum(dim=0) * onehot).sum(dim=1) - 1
    keep = taken & (position < keep_E[e])
    return torch.where(keep, flat, torch.full_like(flat, -1)).view_as(expert_TK)
