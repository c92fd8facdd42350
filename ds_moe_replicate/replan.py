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
   water-fill that expert over its copies; until balanced enough or no free slot helps.

Pure function: loads and a placement in, a placement out. Home slots never change, no rank holds
an expert twice, and the largest rank load under the run-time split is never above the home
placement's (``split.quotas`` keeps that guarantee).

Legend: E logical experts, W ranks, E_loc = E / W, S replica slots per rank, C = E_loc + S slots
per rank, P = W * C physical slots.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .placement import Placement, home_phy2log
from .planner import _occurrence, _water_fill
from .split import quotas

__all__ = ["replan"]


def _check(load_E: np.ndarray, previous: Placement, target_balancedness: float) -> None:
    if load_E.shape != (previous.num_experts,):
        raise ValueError(f"load must have shape [E={previous.num_experts}], got {tuple(load_E.shape)}")
    # NOTE: two reductions, no temporaries (this runs every step): a NaN fails the first test, an
    # infinity the second.
    if load_E.size and (not load_E.min() >= 0 or not np.isfinite(load_E.sum())):
        raise ValueError("load must be finite and non-negative")
    if not 0.0 < target_balancedness <= 1.0:
        raise ValueError(f"target_balancedness must lie in (0, 1], got {target_balancedness}")


def _reversioned(previous: Placement, version: int) -> Placement:
    """``previous`` under a new version (its read-only slot tables are shared, not rebuilt)."""
    return Placement(previous.phy2log_P, previous.log2phy_ER, previous.logcnt_E, previous.ep_size,
                     previous.experts_per_rank, previous.slots_per_rank, version)


def replan(load, previous: Placement, *, target_balancedness: float = 0.995, keep_balancedness: float = 0.98,
           version: Optional[int] = None, with_quotas: bool = False):
    """One layer's next placement, starting from ``previous``.

    Args:
        load: [E] predicted tokens per logical expert (non-negative, finite; rounded to whole
            tokens, as the run-time split shares whole tokens).
        previous: the placement now active (its sizes W, E_loc, S are kept).
        target_balancedness: stop adding replicas once mean / max of the rank loads reaches this.
        keep_balancedness: keep ``previous`` unchanged if it reaches this on the new loads (every
            changed replica is a weight transfer, and at large W the target is often out of
            reach: without this floor every step would free and re-add the same copies).
        version: the new placement's version (default ``previous.version + 1``).

        with_quotas: also return the new placement's slot loads under the run-time split.

    Returns:
        The new ``Placement``. Replicas of ``previous`` that are kept stay in their slots, so
        ``plan_transfers(previous, new)`` moves only what changed. With ``with_quotas``: the
        placement and int64 [P] ``split.quotas`` of the rounded loads on it.
    """
    load_E = np.asarray(load, dtype=np.float64).reshape(-1)
    _check(load_E, previous, target_balancedness)
    if not 0.0 < keep_balancedness <= 1.0:
        raise ValueError(f"keep_balancedness must lie in (0, 1], got {keep_balancedness}")
    placement, tokens_E, slot_P = _replan(load_E, previous, target_balancedness, keep_balancedness,
                                          previous.version + 1 if version is None else version)
    if not with_quotas:
        return placement
    return placement, (slot_P if slot_P is not None else quotas(tokens_E[None], placement))


def _replan(load_E: np.ndarray, previous: Placement, target_balancedness: float, keep_balancedness: float,
            version: int):
    """(placement, rounded loads, its quotas where already computed, else None)."""
    W, e_loc, S = previous.ep_size, previous.experts_per_rank, previous.slots_per_rank
    C, E = e_loc + S, previous.num_experts
    tokens_E = np.rint(load_E).astype(np.int64)
    mean = tokens_E.sum() / W
    if W == 1 or S == 0 or mean <= 0:
        return Placement.from_phy2log(home_phy2log(E, W, S), W, e_loc, S, version), tokens_E, None

    # 1. The previous placement as it is, if it still serves (nothing moves; no new slot tables).
    stop = mean / target_balancedness
    slot_P = quotas(tokens_E[None], previous)
    if slot_P.reshape(W, C).sum(axis=1).max() <= mean / min(keep_balancedness, target_balancedness):
        return _reversioned(previous, version), tokens_E, slot_P
    pl = previous

    # 2. Free the slots of replicas an expert no longer needs: an expert that needs replicas keeps
    # need_e + 1 of them (one more than the bulk rule, so a copy the greedy added for balance is not dropped and re-added
    # at once), its first ones in slot order; then share over the kept copies as the run-time
    # split does.
    phy_P = previous.phy2log_P.copy()
    need_E = np.clip(np.ceil(tokens_E / mean - 1e-9) - 1, 0, W - 1).astype(np.int64)
    need_E = np.minimum(need_E + (need_E > 0), W - 1)
    is_rep_P = (np.arange(phy_P.size) % C) >= e_loc
    p = np.nonzero(is_rep_P & (phy_P >= 0))[0]
    drop = p[_occurrence(phy_P[p]) >= need_E[phy_P[p]]]
    if drop.size:
        phy_P[drop] = -1
        pl = Placement.from_phy2log(phy_P, W, e_loc, S, version)
        slot_P = quotas(tokens_E[None], pl)
    slot_f = slot_P.astype(np.float64)
    rank_W = slot_f.reshape(W, C).sum(axis=1)
    if rank_W.max() <= stop:
        return (pl if drop.size else _reversioned(previous, version)), tokens_E, slot_P

    # 3. Greedy, one replica at a time (few steps: most replicas are already in place).
    phy_WC = phy_P.reshape(W, C)
    ncop_E = np.bincount(phy_P[phy_P >= 0], minlength=E)
    added = False
    for _ in range(int((phy_WC[:, e_loc:] < 0).sum())):
        rmax = int(rank_W.argmax())
        experts = phy_WC[rmax]
        share = np.where((experts >= 0) & (ncop_E[np.maximum(experts, 0)] < W), slot_f[rmax * C:(rmax + 1) * C], -1.0)
        j = int(share.argmax())
        e = int(experts[j])
        free_W = (phy_WC[:, e_loc:] < 0).any(axis=1) & ~(phy_WC == e).any(axis=1)
        lighter = np.where(free_W, rank_W, np.inf)
        rmin = int(lighter.argmin())
        top = rank_W[rmax]
        if top <= stop or share[j] <= 0 or not lighter[rmin] < top * (1 - 1e-12):
            break
        q = rmin * C + e_loc + int((phy_WC[rmin, e_loc:] < 0).argmax())
        phy_P[q] = e
        ncop_E[e] += 1
        added = True
        copies = np.nonzero(phy_P == e)[0]
        ranks = copies // C
        base = rank_W[ranks] - slot_f[copies]
        new = _water_fill(base[None], np.array([float(tokens_E[e])]), np.ones((1, copies.size), dtype=bool))[0]
        slot_f[copies] = new
        rank_W[ranks] = base + new
    if added:
        return Placement.from_phy2log(phy_P, W, e_loc, S, version), tokens_E, None
    return (pl if drop.size else _reversioned(previous, version)), tokens_E, slot_P
