"""The per-step split: how many routes each rank sends to each physical slot.

Runs on every rank, every step, every layer, on the critical path, from the gathered ``[W, E]``
counts, so it must be cheap at W = 64, E = 256 and give every rank the same integers. Two halves:

1. Quotas: each replicated expert's total is shared among its copies to minimise the largest
   rank load. Integer coordinate descent (each expert water-filled over its copies' ranks given
   every other load, as ``planner.split_loads`` does), but vectorised: the replicated experts are
   grouped once per placement into classes whose copies share no rank, and a whole class is
   filled in one set of array operations. An expert with one copy needs no arithmetic at all.
2. Routes: each source rank's routes of an expert are matched to the copies' quotas: first to a
   copy on the source rank itself (``prefer_local``), the rest by the north-west corner rule on
   one flattened stream (experts in order, sources in rank order against copies in slot order),
   which a single ``searchsorted`` resolves.

Everything placement-derived (classes, gather indices) is computed once per placement and cached.
``transport``, ``transport_rank`` and ``quotas`` run the arithmetic compiled (``native``: the same
steps in C, a few microseconds) where a C compiler is at hand; ``transport_numpy`` and
``quotas_numpy`` are the NumPy twins (a few dozen array calls per class and round), used without
a compiler and as the tests' oracle. All arithmetic is int64: the result does not depend on float
rounding, so ranks on different machines, compiled or not, agree exactly.

Legend: W ranks, E logical experts, E_loc = E / W, S replica slots per rank, C = E_loc + S slots
per rank, P = W * C physical slots, X replicated experts (two copies or more), R copies of an
expert at most, N routes matched by the north-west corner rule.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, NamedTuple, Tuple

import numpy as np

from . import native
from .placement import Placement

__all__ = ["RankSplit", "transport", "transport_rank", "transport_numpy", "capacity_transport", "quotas",
           "quotas_numpy"]

# Coordinate-descent rounds over the classes, at most (a round that changes nothing ends the
# descent). From even shares, three rounds beat the old heaviest-first split (two rounds from home
# shares) on the mean and in all but a few draws of the Zipf benchmark; every round costs one pass
# over the classes (docs/control_path.md).
_ROUNDS = 3
# Base load of the padding column of a short copy list: far above any real level, and R * _FAR
# (the cumulative sum of a padded row) stays well inside int64.
_FAR = np.int64(1) << np.int64(40)
# Placements whose derived indices are kept (one per layer and a few in flight is plenty).
_CACHE_SIZE = 256


@dataclass(frozen=True)
class _Class:
    """Replicated experts that share no rank, filled together. Copies run down the first axis
    (R_c = the most copies in the class), experts along the second, so reductions over copies are
    contiguous; padding points at the dummy slot P and the dummy rank W."""

    expert_N: np.ndarray
    slot_RN: np.ndarray
    rank_RN: np.ndarray
    m_R1: np.ndarray  # 1, 2, ..., R_c as a column


class _Layout:
    """Index arrays derived from one placement (read-only, shared by every call on it).

    Built at once: what the compiled split reads (a new plan needs it before its first step).
    Built on first use: the index arrays only the NumPy twins read.

    Attributes:
        rep_X: the replicated experts, in expert order.
        slot_XR / rank_XR: their copies' slots and ranks in ascending slot order; padding points
            at the dummy slot P and the dummy rank W.
        cls_rows / cls_start: the replicated experts coloured so that no two of a class share a
            rank (experts with more copies are coloured first, so the hottest ones lead the first
            class): the classes' rows into X, class after class, and where each starts.
        native_args: the compiled split's layout arguments (sizes and addresses of the arrays
            above, which live as long as the layout).
        native_block / native_block_ptr: the same as one int64 array, and its address (what the
            per-rank split and the re-plan read).
        home_slot_E / home_rank_E: home physical slot and rank of each expert (twins).
        single_E: experts with one copy: their routes all go home (twins).
        valid_XR: real copies (twins).
        classes: the classes as ``_Class`` arrays (twins).
        local: ``_Local``, each replicated expert's copy on each rank (twins).
    """

    def __init__(self, placement: Placement, rep_X, slot_XR, rank_XR, cls_rows, cls_start) -> None:
        self._W, self._e_loc, self._C = placement.ep_size, placement.experts_per_rank, placement.slots_per_rank_total
        self._cnt_E = placement.logcnt_E
        self.rep_X, self.slot_XR, self.rank_XR, self.cls_rows, self.cls_start = (rep_X, slot_XR, rank_XR, cls_rows,
                                                                                cls_start)
        for arr in (rep_X, slot_XR, rank_XR, cls_rows, cls_start):
            arr.setflags(write=False)
        X, R = slot_XR.shape
        self.native_args = (X, R, rep_X.ctypes.data, slot_XR.ctypes.data, rank_XR.ctypes.data, cls_rows.ctypes.data,
                            cls_start.ctypes.data, cls_start.size - 1)
        self.native_block = np.array(self.native_args, dtype=np.int64)
        self.native_block_ptr = self.native_block.ctypes.data

    @functools.cached_property
    def home_slot_E(self) -> np.ndarray:
        e = np.arange(self._W * self._e_loc)
        return (e // self._e_loc) * self._C + e % self._e_loc

    @functools.cached_property
    def home_rank_E(self) -> np.ndarray:
        return np.arange(self._W * self._e_loc) // self._e_loc

    @functools.cached_property
    def single_E(self) -> np.ndarray:
        return np.nonzero(self._cnt_E <= 1)[0]

    @functools.cached_property
    def valid_XR(self) -> np.ndarray:
        return self.slot_XR < self._W * self._C

    @functools.cached_property
    def classes(self) -> Tuple[_Class, ...]:
        out = []
        for c in range(self.cls_start.size - 1):
            rows = self.cls_rows[self.cls_start[c]:self.cls_start[c + 1]]
            r_c = int(self.valid_XR[rows].sum(axis=1).max())
            out.append(_Class(self.rep_X[rows], np.ascontiguousarray(self.slot_XR[rows, :r_c].T),
                              np.ascontiguousarray(self.rank_XR[rows, :r_c].T), np.arange(1, r_c + 1)[:, None]))
        return tuple(out)

    @functools.cached_property
    def local(self) -> "_Local":
        X, R = self.slot_XR.shape
        local_XW = np.full((X, self._W + 1), -1, dtype=np.int64)
        xi, ri = np.nonzero(self.valid_XR)
        loc_rank = self.rank_XR[xi, ri]
        local_XW[xi, loc_rank] = ri
        return _Local(local_XW[:, :self._W], xi * self._W + loc_rank, xi * R + ri, loc_rank, self.slot_XR[xi, ri])


class _Local(NamedTuple):
    """Each replicated expert's copy on each rank, for the NumPy twins.

    Attributes:
        local_XW: for each replicated expert and rank, the copy index (into R) held by that rank,
            or -1.
        loc_src / loc_dst: flat indices into [X, W] and [X, R] of every real copy (the source on
            its own rank, and the copy), for the local matches of ``prefer_local``.
        loc_rank / loc_slot: the rank and slot of those copies.
    """

    local_XW: np.ndarray
    loc_src: np.ndarray
    loc_dst: np.ndarray
    loc_rank: np.ndarray
    loc_slot: np.ndarray


_cache: "OrderedDict[tuple, _Layout]" = OrderedDict()
# The layout of each recent placement object (kept alive here, so its id is not reused): a layer's
# active placement serves many steps, and hashing its slot table every step is a cost of its own.
_by_object: "OrderedDict[int, Tuple[Placement, _Layout]]" = OrderedDict()


def _layout(placement: Placement) -> _Layout:
    seen = _by_object.get(id(placement))
    if seen is not None and seen[0] is placement:
        return seen[1]
    lay = _layout_of(placement)
    _by_object[id(placement)] = (placement, lay)
    if len(_by_object) > _CACHE_SIZE:
        _by_object.popitem(last=False)
    return lay


def _layout_of(placement: Placement) -> _Layout:
    W, e_loc, C = placement.ep_size, placement.experts_per_rank, placement.slots_per_rank_total
    key = (placement.phy2log_P.tobytes(), W, e_loc, C)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    cnt_E = placement.logcnt_E
    R = int(cnt_E.max(initial=1))
    # Compiled where it can be: the colouring is a loop over experts, a hundred microseconds in
    # Python at E = 256, W = 64, and every new plan needs it before its first step.
    built = native.layout_of(placement.phy2log_P, W, C, cnt_E, int((cnt_E > 1).sum()), R)
    out = _Layout(placement, *(built if built is not None else _layout_numpy(placement, R)))
    _cache[key] = out
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return out


def _layout_numpy(placement: Placement, R: int):
    """(rep_X, slot_XR, rank_XR, cls_rows, cls_start) of ``placement``: the twin of
    ``native.layout_of``. Copies in ascending slot order (padding: slot P, rank W); greedy
    colouring, experts with more copies first: an expert joins the first class whose ranks it does
    not touch; each class's rows in ascending order."""
    W, C = placement.ep_size, placement.slots_per_rank_total
    P = W * C
    copies_ER, cnt_E = placement.log2phy_ER, placement.logcnt_E
    rep_X = np.nonzero(cnt_E > 1)[0].astype(np.int64)
    sub = copies_ER[rep_X, :R]
    valid = sub >= 0
    slot_XR = np.ascontiguousarray(np.where(valid, sub, P), dtype=np.int64)
    rank_XR = np.ascontiguousarray(np.where(valid, sub // C, W), dtype=np.int64)
    order = np.argsort(-cnt_E[rep_X], kind="stable")
    taken: List[set] = []
    members: List[List[int]] = []
    for x in order.tolist():
        ranks = set(rank_XR[x][valid[x]].tolist())
        for c, used in enumerate(taken):
            if not used & ranks:
                used |= ranks
                members[c].append(x)
                break
        else:
            taken.append(set(ranks))
            members.append([x])
    rows_of = [np.array(sorted(m), dtype=np.int64) for m in members]
    return (rep_X, slot_XR, rank_XR, np.concatenate(rows_of + [np.zeros(0, dtype=np.int64)]),
            np.cumsum([0] + [r.size for r in rows_of]).astype(np.int64))


def _quotas(total_E: np.ndarray, lay: _Layout, W: int, P: int) -> np.ndarray:
    """int64 [P + 1] tokens each physical slot computes (the last entry is the dummy slot, 0).

    Integer coordinate descent over the classes, ``_ROUNDS`` rounds from even shares.
    """
    tot_X = total_E[lay.rep_X]
    home_W = total_E.reshape(W, -1).sum(axis=1)
    quota_P = np.zeros(P + 1, dtype=np.int64)
    quota_P[lay.home_slot_E[lay.single_E]] = total_E[lay.single_E]
    # Start from even shares (the first copy takes the rounding rest): starting from home shares
    # instead, the first experts filled see the other hot experts still at home and avoid their
    # ranks, and coordinate descent needs several more rounds to undo that.
    ncop_X = lay.valid_XR.sum(axis=1)
    even_XR = np.where(lay.valid_XR, (tot_X // ncop_X)[:, None], 0)
    even_XR[:, 0] += tot_X - even_XR.sum(axis=1)
    quota_P[lay.slot_XR] = even_XR
    quota_P[P] = 0
    moved = np.bincount(lay.rank_XR.reshape(-1), even_XR.reshape(-1), W + 1) \
        - np.bincount(lay.home_rank_E[lay.rep_X], tot_X, W + 1)
    load_W = np.append(home_W, 0) + moved.astype(np.int64)  # exact: token counts are far below 2**53
    load_W[W] = _FAR
    for _ in range(_ROUNDS):
        before = quota_P.copy()
        for c in lay.classes:
            tot = total_E[c.expert_N]
            base = load_W[c.rank_RN] - quota_P[c.slot_RN]
            # Integer water level: the largest L with sum_c max(0, L - base_c) <= total. It is
            # floor(min over m of (total + m lowest bases) / m); floor commutes with the min.
            level = ((tot + np.sort(base, axis=0).cumsum(axis=0)) // c.m_R1).min(axis=0)
            new = np.maximum(level - base, 0)
            # The rest (fewer tokens than copies at the level) goes one each to the copies at the
            # level, in slot order: the integer optimum for these experts given every other load.
            at = base <= level
            new += at & (at.cumsum(axis=0) <= tot - new.sum(axis=0))
            quota_P[c.slot_RN] = new
            load_W[c.rank_RN] = base + new
        if np.array_equal(before, quota_P):
            break  # a fixed point: further rounds would change nothing
    quota_P[P] = 0
    if load_W[:W].max() > home_W.max():
        # NOTE: descent from even shares is not anchored to the home placement; keep the
        # guarantee that replication never makes the largest rank load worse than no replication.
        quota_P[lay.slot_XR] = 0
        quota_P[lay.home_slot_E[lay.rep_X]] = tot_X
        quota_P[P] = 0
    return quota_P


def _check_counts(counts_WE: np.ndarray, placement: Placement, any_rows: bool = False) -> None:
    W, E = placement.ep_size, placement.num_experts
    if counts_WE.ndim != 2 or counts_WE.shape[1] != E or not (any_rows or counts_WE.shape[0] == W):
        want = f"[rows, E={E}]" if any_rows else f"[W={W}, E={E}]"
        raise ValueError(f"counts_WE must have shape {want} for this placement, got {tuple(counts_WE.shape)}")


def quotas(counts_WE: np.ndarray, placement: Placement) -> np.ndarray:
    """Tokens each physical slot computes under the split (the column sums of ``transport``).

    Args:
        counts_WE: int64 [W, E] routes per source rank and logical expert (any number of rows:
            only their sum over rows matters, e.g. [1, E] loads).
        placement: the active placement.

    Returns:
        int64 [P] tokens per physical slot; each expert's copies add up to its total.
    """
    W, P = placement.ep_size, placement.phy2log_P.size
    counts_WE = np.asarray(counts_WE)
    _check_counts(counts_WE, placement, any_rows=True)
    lay = _layout(placement)
    quota_P = np.empty(P, dtype=np.int64)
    if native.split_into(counts_WE, lay, W, placement.slots_per_rank_total, placement.experts_per_rank, _ROUNDS,
                         False, None, quota_P):
        return quota_P
    return quotas_numpy(counts_WE, placement)


def quotas_numpy(counts_WE: np.ndarray, placement: Placement) -> np.ndarray:
    """``quotas`` in NumPy: the twin of the compiled split, and its test oracle."""
    P = placement.phy2log_P.size
    total_E = np.asarray(counts_WE, dtype=np.int64).sum(axis=0)
    return _quotas(total_E, _layout(placement), placement.ep_size, P)[:P]


def transport(counts_WE: np.ndarray, placement: Placement, prefer_local: bool = True) -> np.ndarray:
    """Dropless split: how many routes each rank sends to each physical slot.

    Each expert's total is shared among its copies to minimise the largest rank load (integer
    coordinate descent, see the module docstring); then each source rank's routes are matched to
    copies: first to a copy on the source rank itself (``prefer_local``), the rest in rank order
    to the copies in slot order (north-west corner rule). Deterministic from the gathered counts.
    Runs compiled (``native``) where a C compiler is at hand, else ``transport_numpy``;
    both give the same integers.

    Args:
        counts_WE: int64 [W, E] routes per source rank and logical expert (same on all ranks).
        placement: the active placement.
        prefer_local: keep a rank's routes on its own copy where it has one.

    Returns:
        int64 [W, P] routes from each source rank to each physical slot.
    """
    W, P = placement.ep_size, placement.phy2log_P.size
    _check_counts(counts_WE, placement)
    lay = _layout(placement)
    send_WP = np.empty((W, P), dtype=np.int64)
    if native.split_into(counts_WE, lay, W, placement.slots_per_rank_total, placement.experts_per_rank, _ROUNDS,
                         prefer_local, send_WP, np.empty(P, dtype=np.int64)):
        return send_WP
    return transport_numpy(counts_WE, placement, prefer_local)


@dataclass
class RankSplit:
    """The split as one rank needs it (what the dispatch and the statistics read; read-only by
    convention: built every step, and a frozen dataclass costs microseconds to build).

    Attributes:
        rank: the rank it is for.
        send_P: int64 [P] routes this rank sends to each physical slot (row ``rank`` of ``transport``).
        recv_WC: int64 [W, C] routes each rank sends to this rank's C slots (its columns).
        quota_P: int64 [P] routes each physical slot computes (the column sums), every rank's.
    """

    rank: int
    send_P: np.ndarray
    recv_WC: np.ndarray
    quota_P: np.ndarray

    @property
    def rank_load_W(self) -> np.ndarray:
        """int64 [W] routes each rank computes."""
        W, C = self.recv_WC.shape
        return self.quota_P.reshape(W, C).sum(axis=1)

    @classmethod
    def of_dense(cls, send_WP: np.ndarray, rank: int, C: int) -> "RankSplit":
        """Rank ``rank``'s part of a dense [W, P] split (``transport``, ``capacity_transport``)."""
        return cls(rank, send_WP[rank], send_WP[:, rank * C:(rank + 1) * C], send_WP.sum(axis=0))


def transport_rank(counts_WE: np.ndarray, placement: Placement, rank: int, prefer_local: bool = True,
                   total_E=None, counts_ptr: int = 0) -> RankSplit:
    """``transport`` for one rank: the row it sends, the columns it receives and every slot's
    quota; the same integers as ``transport``'s, in O(E + W * (E_loc + X)) instead of the dense
    O(W * P) (docs/control_path.md).

    Args:
        counts_WE: int64 [W, E] routes per source rank and logical expert (same on all ranks).
        placement: the active placement. rank: this rank.
        prefer_local: keep a rank's routes on its own copy where it has one.
        total_E: int64 [E] the column sums of ``counts_WE``, if already at hand.
        counts_ptr: the address of ``counts_WE``'s first element, if at hand (``Gathered.counts_ptr``:
            looking up a strided view's address costs microseconds).
    """
    # NOTE: few interpreter-level calls on this path: it runs every layer, every step.
    W, e_loc, S = placement.ep_size, placement.experts_per_rank, placement.slots_per_rank
    C = e_loc + S
    P = W * C
    if type(counts_WE) is not np.ndarray or counts_WE.shape != (W, W * e_loc):
        counts_WE = np.asarray(counts_WE)
        _check_counts(counts_WE, placement)
    if not 0 <= rank < W:
        raise ValueError(f"rank must lie in [0, W={W}), got {rank}")
    if counts_WE.dtype != np.int64 or counts_WE.strides[1] != 8:
        counts_WE, counts_ptr = np.ascontiguousarray(counts_WE, dtype=np.int64), 0
    if total_E is None:
        total_E = counts_WE.sum(axis=0)
    elif type(total_E) is not np.ndarray or total_E.dtype != np.int64 or not total_E.flags.c_contiguous:
        total_E = np.ascontiguousarray(total_E, dtype=np.int64)
    out = np.empty(2 * P + W * C, dtype=np.int64)
    if native.split_rank_into(counts_WE, total_E, _layout(placement), rank, C, e_loc, _ROUNDS, prefer_local, out,
                              counts_ptr):
        return RankSplit(rank, out[:P], out[P:P + W * C].reshape(W, C), out[P + W * C:])
    return RankSplit.of_dense(transport_numpy(counts_WE, placement, prefer_local), rank, C)


def transport_numpy(counts_WE: np.ndarray, placement: Placement, prefer_local: bool = True) -> np.ndarray:
    """``transport`` in NumPy: the twin of the compiled split, and its test oracle.

    Args:
        counts_WE: int64 [W, E] routes per source rank and logical expert (same on all ranks).
        placement: the active placement.
        prefer_local: keep a rank's routes on its own copy where it has one.

    Returns:
        int64 [W, P] routes from each source rank to each physical slot.
    """
    W = counts_WE.shape[0]
    P = placement.phy2log_P.size
    lay = _layout(placement)
    counts_WE = counts_WE.astype(np.int64, copy=False)
    total_E = counts_WE.sum(axis=0)
    C = placement.slots_per_rank_total
    send_WP = np.zeros((W, P + 1), dtype=np.int64)
    # Every route home first (one strided copy into the home slots of every rank), then the
    # replicated experts' home columns are cleared and filled by the matching below.
    send_WP[:, :P].reshape(W, W, C)[:, :, :placement.experts_per_rank] = counts_WE.reshape(W, W, -1)
    if lay.rep_X.size == 0:
        return send_WP[:, :P]
    send_WP[:, lay.home_slot_E[lay.rep_X]] = 0
    quota_XR = _quotas(total_E, lay, W, P)[lay.slot_XR]
    rest_XW = counts_WE.T[lay.rep_X]
    if prefer_local:
        loc = lay.local
        take = np.minimum(rest_XW.reshape(-1)[loc.loc_src], quota_XR.reshape(-1)[loc.loc_dst])
        send_WP[loc.loc_rank, loc.loc_slot] = take
        rest_XW.reshape(-1)[loc.loc_src] -= take
        quota_XR.reshape(-1)[loc.loc_dst] -= take
    # North-west corner on one stream: sources (expert-major, rank order) against copies
    # (expert-major, slot order). Each expert's sources and copies hold the same number of
    # routes, so expert boundaries line up in both cumulative sums and no piece crosses experts.
    src_end = np.cumsum(rest_XW.reshape(-1))
    dst_end = np.cumsum(quota_XR.reshape(-1))
    # Merge the two sorted lists of interval ends (a copy's end before an equal source end): the
    # piece of the stream ending at a merged point belongs to the source and the copy whose
    # intervals contain it, i.e. the number of source (copy) ends merged before it.
    n_s, n_d = src_end.size, dst_end.size
    at_d = np.searchsorted(src_end, dst_end, side="left") + np.arange(n_d)
    is_d = np.zeros(n_s + n_d, dtype=bool)
    is_d[at_d] = True
    ends = np.empty(n_s + n_d, dtype=np.int64)
    ends[at_d] = dst_end
    ends[~is_d] = src_end
    amount = ends - np.concatenate(([0], ends[:-1]))
    dst = np.cumsum(is_d) - is_d
    src = np.arange(n_s + n_d) - dst
    keep = amount > 0
    # NOTE: every (source, copy) pair appears at most once in the stream, and the local matches
    # above are separate entries, so adding in place is exact.
    send_WP[src[keep] % W, lay.slot_XR.reshape(-1)[dst[keep]]] += amount[keep]
    return send_WP[:, :P]


def capacity_transport(counts_WE: np.ndarray, capacity_W: np.ndarray, placement: Placement,
                       prefer_local: bool = True) -> np.ndarray:
    """Capacity split: every physical slot takes at most ``capacity_W[w]`` routes from rank w.

    DeepSpeed's capacity-factor semantics, per physical slot instead of per expert: an expert
    with c copies accepts up to c * capacity routes from each rank, so a replicated hot expert
    drops fewer tokens. A rank fills its local copy first (``prefer_local``), then the others in
    slot order; since every copy takes the same capacity from one source, the j-th copy in that
    order takes clip(routes - j * capacity, 0, capacity).

    Args:
        counts_WE: int64 [W, E] routes per source rank and expert. capacity_W: int64 [W].
        placement: the active placement. prefer_local: fill a copy on the source rank first.

    Returns:
        int64 [W, P] routes kept from each source rank for each physical slot.
    """
    W = counts_WE.shape[0]
    P = placement.phy2log_P.size
    lay = _layout(placement)
    counts_WE = counts_WE.astype(np.int64, copy=False)
    cap_W = np.asarray(capacity_W, dtype=np.int64)
    send_WP = np.zeros((W, P + 1), dtype=np.int64)
    send_WP[:, lay.home_slot_E[lay.single_E]] = np.minimum(counts_WE[:, lay.single_E], cap_W[:, None])
    if lay.rep_X.size == 0:
        return send_WP[:, :P]
    X, R = lay.slot_XR.shape
    # Position of copy r in source w's fill order: the local copy first, then the others in slot
    # order (a copy before the local one moves one place back).
    r_R = np.arange(R)
    loc_WX = lay.local.local_XW.T if prefer_local else np.full((W, X), -1, dtype=np.int64)
    has = loc_WX[:, :, None] >= 0
    pos_WXR = np.where(has & (r_R < loc_WX[:, :, None]), r_R + 1, r_R)
    pos_WXR = np.where(has & (r_R == loc_WX[:, :, None]), 0, pos_WXR)
    take = counts_WE[:, lay.rep_X][:, :, None] - pos_WXR * cap_W[:, None, None]
    take = np.clip(take, 0, cap_W[:, None, None]) * lay.valid_XR
    w, x, r = np.nonzero(take)
    send_WP[w, lay.slot_XR[x, r]] = take[w, x, r]
    return send_WP[:, :P]
