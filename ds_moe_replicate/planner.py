"""Replica planner: predicted expert loads in, ``ReplicaPlan`` out.

Pure functions (no process groups, no I/O, no state), vectorised over layers. DeepSpeed's home
placement never moves (logical expert e lives on rank e // E_loc); the planner chooses where the
few replicas go *and* how each expert's tokens are shared among its copies. Sharing is the part
an even split (EPLB's) gets wrong under fixed home placement: a hot expert's home rank also
carries its other home experts, so its copy should take fewer tokens than a copy on an idle rank.

Legend (shape suffixes):
    L  layers             E  logical experts        W  expert-parallel ranks (ep_size)
    S  replica slots/rank  K  slots per rank = E_loc + S
    P  physical slots = W * K                        R  copies per expert at most = min(W, 1 + W * S)

Physical slot p lives on rank p // K; the first E_loc slots of a rank are its home experts in
order, the next S its replica slots (-1 in ``phy2log`` while empty).

The internals run on NumPy: the loops are over replicas, not tokens, and NumPy's per-call cost is
a fraction of torch's at these sizes (24 layers x 256 experts x 64 ranks re-plans in milliseconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from .placement import Placement, log2phy_of

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float], Sequence[Sequence[float]]]

__all__ = [
    "ReplicaPlan",
    "plan_replicas",
    "split_loads",
    "max_rank_load_lower_bound",
    "balancedness",
    "home_balancedness",
    "home_plan",
]

# Coordinate-descent rounds of the share step. Starting from home shares (at run time) two rounds
# are needed: the second catches experts whose copies' ranks changed load after they were filled.
# The planner starts from its greedy shares, where one round suffices.
_SHARE_ROUNDS = 2
_PLAN_ROUNDS = 2
# Base level of a rank holding no copy; W * _FAR stays finite in float64 for any W up to 1e7.
_FAR = 1e300


@dataclass(frozen=True)
class ReplicaPlan:
    """Where every physical slot's expert comes from and how many tokens it is planned to take.

    Attributes:
        phy2log: [L, P] int64, logical expert held by each physical slot (-1: empty replica slot).
        log2phy: [L, E, R] int64, physical slots holding each expert in ascending slot order
            (the one order of ``placement.py``), -1 padded.
        logcnt: [L, E] int64, number of copies of each expert (home included).
        slot_load: [L, P] planned tokens per physical slot (float64, or int64 from integral splits);
            each expert's slot loads add up to its load.
        rank_load: [L, W] planned tokens per rank (sum of its slots' loads).
        ep_size: W.
        slots_per_rank: S.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    slot_load: torch.Tensor
    rank_load: torch.Tensor
    ep_size: int
    slots_per_rank: int

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    def placement(self, layer: int = 0, version: int = 0) -> Placement:
        """Layer ``layer``'s slot layout as the ``Placement`` that dispatch and replicas read."""
        return Placement.from_phy2log(self.phy2log[layer].numpy(), self.ep_size, self.experts_per_rank,
                                      self.slots_per_rank, version)

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def slots_per_rank_total(self) -> int:
        """K = E_loc + S."""
        return self.experts_per_rank + self.slots_per_rank

    def balancedness(self) -> torch.Tensor:
        """[L] mean / max of ``rank_load`` (1.0 for a layer with no load)."""
        return balancedness(self.rank_load)

    def layer(self, index: int) -> "ReplicaPlan":
        """The plan of one layer, as a one-layer plan."""
        sl = slice(index, index + 1)
        return ReplicaPlan(self.phy2log[sl], self.log2phy[sl], self.logcnt[sl], self.slot_load[sl],
                           self.rank_load[sl], self.ep_size, self.slots_per_rank)


# ----------------------------------------------------------------------------- argument checks


def _as_load_LE(load: ArrayLike, name: str = "load") -> np.ndarray:
    if isinstance(load, torch.Tensor):
        arr = load.detach().to("cpu", torch.float64).numpy()
    else:
        arr = np.asarray(load, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"{name} must have shape [E] or [L, E] with E >= 1, got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, found NaN or inf")
    if (arr < 0).any():
        raise ValueError(f"{name} must be non-negative, found minimum {arr.min()}")
    return arr


def _check_sizes(num_experts: int, ep_size: int, slots_per_rank: int) -> None:
    for name, value in (("ep_size", ep_size), ("slots_per_rank", slots_per_rank)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {ep_size}")
    if slots_per_rank < 0:
        raise ValueError(f"slots_per_rank must be >= 0, got {slots_per_rank}")
    if num_experts % ep_size:
        raise ValueError(f"the number of experts ({num_experts}) must be divisible by ep_size ({ep_size})")


def _max_copies(ep_size: int, slots_per_rank: int) -> int:
    return min(ep_size, 1 + ep_size * slots_per_rank)


# ----------------------------------------------------------------------------- water-filling


def _water_level(base_NW: np.ndarray, total_N: np.ndarray, copy_NW: np.ndarray) -> np.ndarray:
    """Level lambda with sum_c max(0, lambda - base_c) = total over the copies (real-valued).

    lambda = min over m of (total + sum of the m lowest bases) / m: every m gives an upper bound
    and the active set of the true level attains it, so no search over m is needed.
    """
    # NOTE: non-copies sit at a huge finite base (not inf) so the cumsum needs no masking; their
    # terms come out far above any real level and never win the minimum.
    b = np.where(copy_NW, base_NW, _FAR)
    b.sort(axis=1)
    level = (total_N[:, None] + np.cumsum(b, axis=1)) / np.arange(1, b.shape[1] + 1)
    return level.min(axis=1)


def _water_fill(base_NW: np.ndarray, total_N: np.ndarray, copy_NW: np.ndarray) -> np.ndarray:
    """Real-valued shares minimising max(base + share) over the copies; zero off the copies."""
    level = _water_level(base_NW, total_N, copy_NW)
    return np.where(copy_NW, np.maximum(level[:, None] - base_NW, 0.0), 0.0)


def _water_fill_int(base_NW: np.ndarray, total_N: np.ndarray, copy_NW: np.ndarray) -> np.ndarray:
    """Integer shares (int64) with the same optimum; exact integer arithmetic, so every rank that
    runs it on the same counts gets the same answer. Ties go to the lower rank."""
    base = base_NW.astype(np.int64)
    total = total_N.astype(np.int64)
    level = np.floor(_water_level(base_NW.astype(np.float64), total.astype(np.float64), copy_NW)).astype(np.int64)

    def filled(lv: np.ndarray) -> np.ndarray:
        return np.where(copy_NW, np.maximum(lv[:, None] - base, 0), 0).sum(axis=1)

    # NOTE: the float level can be off by one either way; fix it in integers.
    level = np.where(filled(level) > total, level - 1, level)
    level = np.where(filled(level + 1) <= total, level + 1, level)
    share = np.where(copy_NW, np.maximum(level[:, None] - base, 0), 0)
    rest = total - share.sum(axis=1)
    # The copies sitting at the level (base <= level) each take one more token, lowest rank first.
    at_level = copy_NW & (base <= level[:, None])
    order = np.cumsum(at_level, axis=1)
    share = share + (at_level & (order <= rest[:, None]))
    return share


# ----------------------------------------------------------------------------- share step
#
# State of a placement under construction, per layer: phy [L, P] (expert per slot), slot [L, P]
# (tokens per slot), rank [L, W] (tokens per rank), copies [L, E, R] (slots holding each expert,
# -1 padded) and ncop [L, E]. Working on slots rather than a dense [L, W, E] share table keeps
# every step's gathers small (P = W * K instead of W * E entries per layer).


def _home_phy2log(L: int, num_experts: int, ep_size: int, slots_per_rank: int) -> np.ndarray:
    e_loc = num_experts // ep_size
    phy_LWK = np.full((L, ep_size, e_loc + slots_per_rank), -1, dtype=np.int64)
    phy_LWK[:, :, :e_loc] = np.arange(num_experts).reshape(ep_size, e_loc)
    return phy_LWK.reshape(L, -1)


def _home_slots(num_experts: int, ep_size: int, slots_per_rank: int) -> np.ndarray:
    """[E] the home physical slot of every logical expert."""
    e_loc = num_experts // ep_size
    e = np.arange(num_experts)
    return (e // e_loc) * (e_loc + slots_per_rank) + e % e_loc


def _home_load(load_LE: np.ndarray, num_slots: int, home_E: np.ndarray) -> np.ndarray:
    slot_LP = np.zeros((load_LE.shape[0], num_slots), dtype=load_LE.dtype)
    slot_LP[:, home_E] = load_LE
    return slot_LP


def _fill_expert(rows, e, load_LE, slot_LP, rank_LW, copies_LER, ncop_LE, K, fill) -> None:
    """Re-share expert e[i] of layer rows[i] over its copies, given every other slot's load."""
    cs = copies_LER[rows, e, : int(ncop_LE[rows, e].max())]
    valid = cs >= 0
    cs_safe = np.maximum(cs, 0)
    at = rows[:, None]
    cr = cs_safe // K
    base = rank_LW[at, cr] - np.where(valid, slot_LP[at, cs_safe], 0)
    new = fill(base, load_LE[rows, e], valid)
    # NOTE: a rank holds at most one copy of an expert, so no two writes below hit one rank.
    ai, ci = np.nonzero(valid)
    slot_LP[rows[ai], cs[ai, ci]] = new[ai, ci]
    rank_LW[rows[ai], cr[ai, ci]] = base[ai, ci] + new[ai, ci]


def _share_rounds(load_LE, slot_LP, rank_LW, copies_LER, ncop_LE, K, rounds: int, integral: bool) -> None:
    """Coordinate descent: re-fill each replicated expert over its copies, heaviest first.

    Each fill is optimal for its expert given the others, so the largest rank load never rises;
    starting from home shares, the result is never worse than no replication.
    """
    fill = _water_fill_int if integral else _water_fill
    replicated_LE = ncop_LE > 1
    n_rep_L = replicated_LE.sum(axis=1)
    # Heaviest replicated experts first; ties by expert index (stable sort) for determinism.
    order_LE = np.argsort(np.where(replicated_LE, -load_LE, np.inf), axis=1, kind="stable")
    for _ in range(rounds):
        for i in range(int(n_rep_L.max(initial=0))):
            rows = np.nonzero(n_rep_L > i)[0]
            _fill_expert(rows, order_LE[rows, i], load_LE, slot_LP, rank_LW, copies_LER, ncop_LE, K, fill)


def _finish(phy2log_LP: np.ndarray, slot_LP: np.ndarray, num_experts: int, ep_size: int,
            slots_per_rank: int) -> ReplicaPlan:
    log2phy, logcnt = log2phy_of(phy2log_LP, num_experts, _max_copies(ep_size, slots_per_rank))
    rank = slot_LP.reshape(slot_LP.shape[0], ep_size, -1).sum(axis=2)
    return ReplicaPlan(
        phy2log=torch.from_numpy(np.ascontiguousarray(phy2log_LP, dtype=np.int64)),
        log2phy=torch.from_numpy(log2phy),
        logcnt=torch.from_numpy(np.ascontiguousarray(logcnt, dtype=np.int64)),
        slot_load=torch.from_numpy(np.ascontiguousarray(slot_LP)),
        rank_load=torch.from_numpy(np.ascontiguousarray(rank)),
        ep_size=ep_size,
        slots_per_rank=slots_per_rank,
    )


# ----------------------------------------------------------------------------- public entry points


def home_plan(load: ArrayLike, ep_size: int, slots_per_rank: int = 0) -> ReplicaPlan:
    """The plan with every replica slot empty: DeepSpeed's placement, no replication.

    Args:
        load: [E] or [L, E] tokens per logical expert.
        ep_size: W. slots_per_rank: S (slots are laid out, but left empty).

    Returns:
        A ``ReplicaPlan`` whose ``rank_load`` is what the stock layer computes per rank.
    """
    load_LE = _as_load_LE(load)
    L, E = load_LE.shape
    _check_sizes(E, ep_size, slots_per_rank)
    phy_LP = _home_phy2log(L, E, ep_size, slots_per_rank)
    slot_LP = _home_load(load_LE, phy_LP.shape[1], _home_slots(E, ep_size, slots_per_rank))
    return _finish(phy_LP, slot_LP, E, ep_size, slots_per_rank)


def plan_replicas(load: ArrayLike, ep_size: int, slots_per_rank: int, *,
                  target_balancedness: float = 0.995) -> ReplicaPlan:
    """Choose replica placements and token shares that minimise the largest rank load.

    Greedy placement, vectorised over layers: while a replica slot is free on a rank lighter than
    the heaviest rank, copy the expert with the largest share on the heaviest rank to the lightest
    rank that has a free slot and no copy of it, and water-fill that expert's tokens over its
    copies. Then every replicated expert's shares are refined by coordinate descent. Home
    placement is never changed, and the result is never worse than no replication.

    Args:
        load: [E] or [L, E] predicted tokens per logical expert (non-negative, finite).
        ep_size: W, expert-parallel world size; E must be divisible by it.
        slots_per_rank: S, replica slots per rank (0 gives the home plan).
        target_balancedness: stop placing replicas in a layer once mean / max of its rank loads
            reaches this (every further copy is a weight transfer for a vanishing gain).

    Returns:
        ``ReplicaPlan`` with a leading layer dimension (L = 1 for an [E] load).
    """
    load_LE = _as_load_LE(load)
    L, E = load_LE.shape
    _check_sizes(E, ep_size, slots_per_rank)
    if not 0.0 < target_balancedness <= 1.0:
        raise ValueError(f"target_balancedness must lie in (0, 1], got {target_balancedness}")
    W, S = ep_size, slots_per_rank
    e_loc, K = E // W, E // W + S
    home_E = _home_slots(E, W, S)

    phy_LP = _home_phy2log(L, E, W, S)
    slot_LP = _home_load(load_LE, W * K, home_E)
    rank_LW = slot_LP.reshape(L, W, K).sum(axis=2)
    # NOTE: int32 and the [L, W, E] bool table keep the per-step state small; allocating it is a
    # visible part of a 24 x 256 x 64 re-plan.
    copies_LER = np.full((L, E, _max_copies(W, S)), -1, dtype=np.int32)
    copies_LER[:, :, 0] = home_E
    held_LWE = np.zeros((L, W, E), dtype=bool)
    held_LWE[:, home_E // K, np.arange(E)] = True
    ncop_LE = np.ones((L, E), dtype=np.int64)
    nfree_LW = np.full((L, W), S, dtype=np.int64)
    stop_L = load_LE.sum(axis=1) / W / target_balancedness

    # Bulk phase: experts heavier than a mean rank get their obvious replicas in one go, so the
    # greedy below only refines (at 24 x 256 x 64 it cuts the sequential steps several-fold).
    li, ei, ri = _bulk_replicas(load_LE, rank_LW, W, S, home_E // K)
    if li.size:
        # The k-th replica dealt to a rank takes its k-th replica slot; the j-th replica of an
        # expert is its copy number j (the home copy is 0).
        p = ri * K + e_loc + _occurrence(li * W + ri)
        phy_LP[li, p] = ei
        np.subtract.at(nfree_LW, (li, ri), 1)
        held_LWE[li, ri, ei] = True
        copies_LER[li, ei, 1 + _occurrence(li * E + ei)] = p
        np.add.at(ncop_LE, (li, ei), 1)
        _share_rounds(load_LE, slot_LP, rank_LW, copies_LER, ncop_LE, K, 1, integral=False)

    rows = np.arange(L)
    n, at = np.arange(L), rows[:, None]

    for _ in range(W * S if W > 1 else 0):
        load_W = rank_LW[rows]
        rmax = load_W.argmax(axis=1)
        local_K = rmax[:, None] * K + np.arange(K)
        e_K = phy_LP[at, local_K]
        movable = (e_K >= 0) & (ncop_LE[at, np.maximum(e_K, 0)] < W)
        share_K = np.where(movable, slot_LP[at, local_K], -1.0)
        j = share_K.argmax(axis=1)
        e, share = e_K[n, j], share_K[n, j]
        lighter = np.where((nfree_LW[rows] > 0) & ~held_LWE[rows, :, e], load_W, np.inf)
        rmin = lighter.argmin(axis=1)
        # A layer is done once it is balanced enough, or no free slot sits on a rank lighter than
        # its heaviest one.
        top = load_W[n, rmax]
        gain = (top > stop_L[rows]) & (lighter[n, rmin] < top * (1 - 1e-12)) & (share > 0)
        if not gain.all():
            rows, e, rmin = rows[gain], e[gain], rmin[gain]
            if rows.size == 0:
                break
            n, at = np.arange(rows.size), rows[:, None]
        p = rmin * K + e_loc + S - nfree_LW[rows, rmin]  # replica slots fill from the left
        phy_LP[rows, p] = e
        nfree_LW[rows, rmin] -= 1
        copies_LER[rows, e, ncop_LE[rows, e]] = p
        held_LWE[rows, rmin, e] = True
        ncop_LE[rows, e] += 1
        _fill_expert(rows, e, load_LE, slot_LP, rank_LW, copies_LER, ncop_LE, K, _water_fill)

    _share_rounds(load_LE, slot_LP, rank_LW, copies_LER, ncop_LE, K, _PLAN_ROUNDS, integral=False)
    return _finish(phy_LP, slot_LP, E, W, S)


def _occurrence(key: np.ndarray) -> np.ndarray:
    """For each entry, how many earlier entries share its key (0, 1, 2, ... in input order)."""
    order = np.argsort(key, kind="stable")
    ks = key[order]
    first = np.r_[0, np.nonzero(np.diff(ks))[0] + 1]
    out = np.empty(key.size, dtype=np.int64)
    out[order] = np.arange(ks.size) - np.repeat(first, np.diff(np.r_[first, ks.size]))
    return out


def _bulk_replicas(load_LE: np.ndarray, rank_LW: np.ndarray, W: int, S: int, home_rank_E: np.ndarray):
    """(layer, expert, rank) of the replicas every good plan has: an expert of load x gets
    ceil(x / mean) - 1 of them, hottest first, dealt to the lightest ranks in turn (one slot of
    every rank per round), skipping a rank that is the expert's home. At most W * S in all."""
    out = []
    mean_L = load_LE.sum(axis=1) / W
    for layer in range(load_LE.shape[0]):
        if mean_L[layer] <= 0:
            continue
        need = np.clip(np.ceil(load_LE[layer] / mean_L[layer] - 1e-9) - 1, 0, W - 1).astype(np.int64)
        hot = np.argsort(-load_LE[layer], kind="stable")
        experts = np.repeat(hot, need[hot])[: W * S]
        ranks = np.tile(np.argsort(rank_LW[layer], kind="stable"), S)[: experts.size]
        keep = ranks != home_rank_E[experts]
        out.append((np.full(int(keep.sum()), layer), experts[keep], ranks[keep]))
    if not out:
        return (np.zeros(0, dtype=np.int64),) * 3
    return tuple(np.concatenate(parts) for parts in zip(*out))


def split_loads(load: ArrayLike, phy2log: ArrayLike, ep_size: int, integral: bool = False) -> torch.Tensor:
    """Share each expert's load among the copies a placement already has.

    The runtime half of the planner: with the active plan's ``phy2log`` and the step's real
    counts, decide how many tokens each copy computes. Deterministic: the same inputs give the
    same shares on every rank (with ``integral=True`` the arithmetic is exact integers).

    Args:
        load: [E] or [L, E] tokens per logical expert (non-negative integers if ``integral``).
        phy2log: [P] or [L, P] logical expert per physical slot, -1 for empty.
        ep_size: W.
        integral: return int64 token counts that add up exactly to each expert's load.

    Returns:
        [L, P] tokens per physical slot (float64, or int64 if ``integral``).
    """
    load_LE = _as_load_LE(load)
    if integral and not np.array_equal(load_LE, np.round(load_LE)):
        raise ValueError("load must hold whole token counts when integral=True")
    phy = phy2log.detach().cpu().numpy() if isinstance(phy2log, torch.Tensor) else np.asarray(phy2log)
    phy = phy.astype(np.int64).reshape(load_LE.shape[0], -1) if phy.ndim == 1 else phy.astype(np.int64)
    L, E = load_LE.shape
    if phy.shape[0] != L or phy.shape[1] % ep_size:
        raise ValueError(f"phy2log shape {tuple(phy.shape)} does not fit load [L={L}, E={E}] and ep_size={ep_size}")
    if (phy >= E).any() or (phy < -1).any():
        raise ValueError(f"phy2log entries must lie in [-1, {E - 1}]")
    if integral:
        load_LE = load_LE.astype(np.int64)
    P = phy.shape[1]
    K = P // ep_size
    home_E = _home_slots(E, ep_size, K - E // ep_size)
    if not np.array_equal(phy[:, home_E], np.broadcast_to(np.arange(E), (L, E))):
        raise ValueError("phy2log must keep every expert in its home slot (DeepSpeed's placement)")
    # A rank holds an expert at most once (distinct fill values keep padding from colliding).
    copies_LER, ncop_LE = log2phy_of(phy, E)
    ranks = np.where(copies_LER >= 0, copies_LER // K, -1 - np.arange(copies_LER.shape[2]))
    if (np.diff(np.sort(ranks, axis=2), axis=2) == 0).any():
        raise ValueError("phy2log places two copies of one expert on the same rank")
    slot_LP = _home_load(load_LE, P, home_E)
    rank_LW = slot_LP.reshape(L, ep_size, K).sum(axis=2)
    _share_rounds(load_LE, slot_LP, rank_LW, copies_LER, ncop_LE, K, _SHARE_ROUNDS, integral)
    return torch.from_numpy(np.ascontiguousarray(slot_LP))


def balancedness(rank_load: ArrayLike) -> torch.Tensor:
    """mean / max over the last dimension (in (0, 1]; 1.0 where nothing is loaded)."""
    x = rank_load if isinstance(rank_load, torch.Tensor) else torch.as_tensor(np.asarray(rank_load))
    x = x.to(torch.float64)
    top = x.amax(dim=-1)
    return torch.where(top > 0, x.mean(dim=-1) / top.clamp_min(1e-300), torch.ones_like(top))


def home_balancedness(counts_E: ArrayLike, ep_size: int) -> float:
    """Balancedness of the routes each rank's home experts receive: the stock layer's (and the
    ragged path's without replicas) real work per rank."""
    x = counts_E if isinstance(counts_E, torch.Tensor) else torch.as_tensor(np.asarray(counts_E))
    return float(balancedness(x.reshape(ep_size, -1).sum(dim=1)))


def max_rank_load_lower_bound(load: ArrayLike, ep_size: int, slots_per_rank: int) -> torch.Tensor:
    """A lower bound on the largest rank load any plan with these sizes can reach.

    The bound is the largest of: the mean rank load; for S = 0, the home placement's maximum
    (nothing can move); and the smallest B such that every expert fits in copies of at most B
    tokens, ceil(load_e / B) copies each, using at most W copies per expert and W * S replicas in
    all (a copy's tokens never exceed its rank's load).

    Args:
        load: [E] or [L, E] tokens per logical expert. ep_size: W. slots_per_rank: S.

    Returns:
        [L] float64 lower bound on max(rank_load).
    """
    load_LE = _as_load_LE(load)
    L, E = load_LE.shape
    _check_sizes(E, ep_size, slots_per_rank)
    W, S = ep_size, slots_per_rank
    mean = load_LE.sum(axis=1) / W
    if S == 0 or W == 1:
        return torch.from_numpy(load_LE.reshape(L, W, -1).sum(axis=2).max(axis=1))
    top = load_LE.max(axis=1)
    lo = np.maximum(mean, top / W)
    hi = np.maximum(top, lo)

    def fits(b: np.ndarray) -> np.ndarray:
        b = np.maximum(b, 1e-300)[:, None]
        replicas = np.maximum(np.ceil(load_LE / b - 1e-9) - 1, 0).sum(axis=1)
        return replicas <= W * S

    # Binary search on B: "fits" is monotone in B; 60 halvings reach float precision.
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        ok = fits(mid)
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    # NOTE: lo only ever holds the initial bound or a B shown not to fit, so lo <= the true minimum.
    return torch.from_numpy(np.maximum(lo, mean))
