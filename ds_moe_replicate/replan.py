"""Incremental re-plan for the every-step predictors (lookahead, oracle).

``plan_replicas`` plans from the home placement: its greedy places up to W * S replicas one by
one and refines every replicated expert's shares by coordinate descent, a few milliseconds per
layer at E = 256, W = 64. A predictor that plans every step sees loads close to the previous
step's, so most of the previous placement still fits. ``replan`` starts from it instead:

1. share the loads over the previous copies with the run-time split (``split.quotas``), and keep
   the placement if it is balanced enough (``keep_balancedness``; no transfer at all);
2. otherwise free the slots of replicas an expert no longer needs (an expert of load x keeps
   ceil(x / mean) replicas if it needs any, one more than ``plan_replicas``' bulk phase gives it; its first ones
   in slot order stay, so their weights need not move), and re-share;
3. then add replicas greedily, as ``plan_replicas`` does: copy the expert with the largest
   share on the heaviest rank to the lightest rank with a free slot that holds no copy of it, and
   water-fill that expert over its copies (in whole tokens); until balanced enough or no free
   slot helps.

Every step of it is integer arithmetic or a comparison of the same doubles, so it runs compiled
(``native.replan_into``: the greedy is a loop of small steps, a few microseconds in C where NumPy
takes milliseconds at E = 256, W = 64) and ``_replan_numpy`` is its twin with the same integers:
ranks agree whether or not they could build the library (docs/control_path.md).

Pure function: loads and a placement in, a placement out. Home slots never change, no rank holds
an expert twice, and the largest rank load under the run-time split is never above the home
placement's (``split.quotas`` keeps that guarantee).

Legend: E logical experts, W ranks, E_loc = E / W, S replica slots per rank, C = E_loc + S slots
per rank, P = W * C physical slots.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from . import native
from .placement import Placement, home_phy2log
from .planner import _water_fill_int
from .split import _ROUNDS, _layout, quotas

__all__ = ["replan", "Replanned"]

# What a re-plan did (``Replanned.status``).
KEPT, DROPPED, ADDED, HOME = 0, 1, 2, 3


class Replanned(NamedTuple):
    """A re-plan with the numbers its caller's cost check reads (all under the run-time split of
    the loads rounded to whole tokens).

    Attributes:
        placement: the new placement.
        quota_P: int64 [P] tokens each physical slot computes on it.
        home_max: the largest rank load with every expert at home (no replication).
        plan_max: the largest rank load on ``placement``.
        tokens: the rounded loads' sum.
        status: KEPT (``previous`` unchanged), DROPPED (replicas freed), ADDED (replicas added) or
            HOME (nothing to plan: one rank, no slots or no load).
    """

    placement: Placement
    quota_P: np.ndarray
    home_max: int
    plan_max: int
    tokens: int
    status: int


def _check(load_E: np.ndarray, previous: Placement, target_balancedness: float, keep_balancedness: float) -> None:
    if load_E.shape != (previous.num_experts,):
        raise ValueError(f"load must have shape [E={previous.num_experts}], got {tuple(load_E.shape)}")
    if not 0.0 < target_balancedness <= 1.0:
        raise ValueError(f"target_balancedness must lie in (0, 1], got {target_balancedness}")
    if not 0.0 < keep_balancedness <= 1.0:
        raise ValueError(f"keep_balancedness must lie in (0, 1], got {keep_balancedness}")


def replan(load, previous: Placement, *, target_balancedness: float = 0.995, keep_balancedness: float = 0.98,
           version: Optional[int] = None, with_quotas: bool = False):
    """One layer's next placement, starting from ``previous``.

    Args:
        load: [E] predicted tokens per logical expert (non-negative, finite, at most 2**53;
            rounded to whole tokens, as the run-time split shares whole tokens).
        previous: the placement now active (its sizes W, E_loc, S are kept).
        target_balancedness: stop adding replicas once mean / max of the rank loads reaches this.
        keep_balancedness: keep ``previous`` unchanged if it reaches this on the new loads (every
            changed replica is a weight transfer, and at large W the target is often out of
            reach: without this floor every step would free and re-add the same copies).
        version: the new placement's version (default ``previous.version + 1``); with
            ``previous.version``, a kept placement is ``previous`` itself.
        with_quotas: return a ``Replanned`` (the placement with its quotas and rank loads).

    Returns:
        The new ``Placement`` (a ``Replanned`` with ``with_quotas``). Replicas of ``previous``
        that are kept stay in their slots, so ``plan_transfers(previous, new)`` moves only what
        changed.
    """
    load_E = load if type(load) is np.ndarray and load.dtype == np.float64 and load.flags.c_contiguous \
        else np.ascontiguousarray(load, dtype=np.float64).reshape(-1)
    _check(load_E, previous, target_balancedness, keep_balancedness)
    W, e_loc, S = previous.ep_size, previous.experts_per_rank, previous.slots_per_rank
    version = previous.version + 1 if version is None else version
    done = native.replan_into(load_E, W, e_loc, S, previous.phy_ptr, _layout(previous).native_block_ptr, _ROUNDS,
                              keep_balancedness, target_balancedness)
    if done is None:
        done = _replan_numpy(load_E, previous, target_balancedness, keep_balancedness)
    tokens_E, phy_P, quota_P, info = done
    status = int(info[0])
    if status == KEPT:
        placement = previous if version == previous.version else previous.with_version(version)
    else:
        placement = Placement.from_phy2log(phy_P, W, e_loc, S, version)
    if not with_quotas:
        return placement
    return Replanned(placement, quota_P, int(info[1]), int(info[2]), int(info[3]), status)


def _rank_loads(quota_P: np.ndarray, W: int) -> np.ndarray:
    return quota_P.reshape(W, -1).sum(axis=1)


def _replan_numpy(load_E: np.ndarray, previous: Placement, target_balancedness: float, keep_balancedness: float):
    """The re-plan in NumPy: the twin of ``native.replan_into`` (the same steps, integers and
    double comparisons) and its test oracle. Returns (tokens [E], slot table [P], quotas [P],
    info [4]: status, home max, plan max, tokens' sum)."""
    W, e_loc, S = previous.ep_size, previous.experts_per_rank, previous.slots_per_rank
    C, E = e_loc + S, previous.num_experts
    if load_E.size and not (load_E.min() >= 0 and load_E.max() <= 2.0 ** 53):
        raise ValueError("load must be finite, non-negative and at most 2**53")
    tokens_E = np.rint(load_E).astype(np.int64)
    total = int(tokens_E.sum())
    home_max = int(tokens_E.reshape(W, e_loc).sum(axis=1).max(initial=0))
    mean = total / W

    def out(status, phy_P, slot_P, top):
        return tokens_E, phy_P, slot_P, np.array([status, home_max, top, total], dtype=np.int64)

    if W == 1 or S == 0 or mean <= 0:
        home = Placement.from_phy2log(home_phy2log(E, W, S), W, e_loc, S)
        return out(HOME, home.phy2log_P.copy(), quotas(tokens_E[None], home), home_max)

    # 1. The previous placement as it is, if it still serves (nothing moves).
    stop = mean / target_balancedness
    slot_P = quotas(tokens_E[None], previous)
    rank_W = _rank_loads(slot_P, W)
    if rank_W.max() <= mean / min(keep_balancedness, target_balancedness):
        return out(KEPT, previous.phy2log_P.copy(), slot_P, int(rank_W.max()))

    # 2. Free the slots of replicas an expert no longer needs: an expert that needs replicas keeps
    # need_e + 1 of them (one more than the bulk rule, so a copy the greedy added for balance is
    # not dropped and re-added at once), its first ones in slot order.
    phy_P = previous.phy2log_P.copy()
    phy_WC = phy_P.reshape(W, C)
    need_E = np.clip(np.ceil(tokens_E / mean - 1e-9) - 1, 0, W - 1).astype(np.int64)
    need_E = np.minimum(need_E + (need_E > 0), W - 1)
    status = KEPT
    seen_E = np.zeros(E, dtype=np.int64)
    for p in np.nonzero(((np.arange(phy_P.size) % C) >= e_loc) & (phy_P >= 0))[0]:
        e = phy_P[p]
        if seen_E[e] >= need_E[e]:
            phy_P[p] = -1
            status = DROPPED
        seen_E[e] += 1
    if status == DROPPED:
        slot_P = quotas(tokens_E[None], Placement.from_phy2log(phy_P, W, e_loc, S))
        rank_W = _rank_loads(slot_P, W)
    if rank_W.max() <= stop:
        return out(status, phy_P, slot_P, int(rank_W.max()))

    # 3. Greedy, one replica at a time (few steps: most replicas are already in place).
    slot_P = slot_P.copy()
    ncop_E = np.bincount(phy_P[phy_P >= 0], minlength=E)
    added = False
    for _ in range(int((phy_WC[:, e_loc:] < 0).sum())):
        rmax = int(rank_W.argmax())
        experts = phy_WC[rmax]
        share = np.where((experts >= 0) & (ncop_E[np.maximum(experts, 0)] < W), slot_P[rmax * C:(rmax + 1) * C], -1)
        j = int(share.argmax())
        e = int(experts[j])
        free_W = (phy_WC[:, e_loc:] < 0).any(axis=1) & ~(phy_WC == e).any(axis=1)
        top = rank_W[rmax]
        if top <= stop or share[j] <= 0 or not free_W.any():
            break
        rmin = int(np.where(free_W, rank_W, np.iinfo(np.int64).max).argmin())
        if not rank_W[rmin] < top:
            break
        q = rmin * C + e_loc + int((phy_WC[rmin, e_loc:] < 0).argmax())
        phy_P[q] = e
        slot_P[q] = 0
        ncop_E[e] += 1
        added = True
        copies = np.nonzero(phy_P == e)[0]
        ranks = copies // C
        base = rank_W[ranks] - slot_P[copies]
        new = _water_fill_int(base[None], np.array([tokens_E[e]]), np.ones((1, copies.size), dtype=bool))[0]
        slot_P[copies] = new
        rank_W[ranks] = base + new
    if added:
        slot_P = quotas(tokens_E[None], Placement.from_phy2log(phy_P, W, e_loc, S))
        return out(ADDED, phy_P, slot_P, int(_rank_loads(slot_P, W).max()))
    return out(status, phy_P, slot_P, int(rank_W.max()))
