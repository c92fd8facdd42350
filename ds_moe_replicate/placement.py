"""The slot layout of one layer: which logical expert each physical slot holds.

One type, ``Placement``, built by the planner (``ReplicaPlan.placement``) and read by the split,
the dispatch and the replica store. The layout is the one of ``docs/design.md`` ("Slot layout"):
DeepSpeed's home placement never moves (expert e lives on rank e // E_loc); physical slot p lives
on rank p // C; the first E_loc slots of a rank are its home experts in order, the next S its
replica slots (-1 in ``phy2log`` while empty).

``log2phy`` lists each expert's slots in ascending slot order, -1 padded. That is the one order
of the package: the split fills an expert's copies in it, and the slot-assignment kernels read it.

Legend: L layers, E logical experts, W ranks, S replica slots per rank, C = E_loc + S slots per
rank, P = W * C physical slots, R copies per expert at most.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from . import native

__all__ = ["Placement", "Transfer", "plan_transfers", "missing_transfers", "log2phy_of", "home_phy2log"]


def home_phy2log(num_experts: int, ep_size: int, slots_per_rank: int) -> np.ndarray:
    """int64 [P]: DeepSpeed's home placement with every replica slot empty."""
    e_loc = num_experts // ep_size
    phy = np.full((ep_size, e_loc + slots_per_rank), -1, dtype=np.int64)
    phy[:, :e_loc] = np.arange(num_experts).reshape(ep_size, e_loc)
    return phy.reshape(-1)


def log2phy_of(phy2log_LP: np.ndarray, num_experts: int,
               max_copies: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Each expert's slots in ascending slot order, and its copy count, for every layer.

    Args:
        phy2log_LP: int64 [L, P] (-1 = empty slot).
        num_experts: E.
        max_copies: R; None = the largest copy count present.

    Returns:
        (log2phy int64 [L, E, R] -1 padded, logcnt int64 [L, E]).
    """
    phy = np.asarray(phy2log_LP, dtype=np.int64)
    L, P = phy.shape
    if L == 1 and max_copies is None:
        return _log2phy_one(phy[0], num_experts)
    # Sort slots by (expert, slot index); empty slots last.
    key = np.where(phy >= 0, phy, num_experts) * P + np.arange(P)
    order_LP = np.argsort(key, axis=1, kind="stable")
    sorted_e = np.take_along_axis(phy, order_LP, axis=1)
    flat = (np.arange(L)[:, None] * (num_experts + 1) + np.where(sorted_e >= 0, sorted_e, num_experts)).ravel()
    logcnt_LE = np.bincount(flat, minlength=L * (num_experts + 1)).reshape(L, -1)[:, :num_experts]
    start_LE = np.cumsum(logcnt_LE, axis=1) - logcnt_LE
    pos = np.arange(P)[None, :] - np.take_along_axis(start_LE, np.maximum(sorted_e, 0), axis=1)
    R = int(logcnt_LE.max(initial=1)) if max_copies is None else max_copies
    log2phy_LER = np.full((L, num_experts, R), -1, dtype=np.int64)
    li, ci = np.nonzero(sorted_e >= 0)
    log2phy_LER[li, sorted_e[li, ci], pos[li, ci]] = order_LP[li, ci]
    return log2phy_LER, logcnt_LE.astype(np.int64)


def _log2phy_one(phy_P: np.ndarray, num_experts: int) -> Tuple[np.ndarray, np.ndarray]:
    """``log2phy_of`` of one layer in fewer array calls (every new plan builds one)."""
    slots = np.flatnonzero(phy_P >= 0)
    experts = phy_P[slots]
    order = np.argsort(experts, kind="stable")  # by expert, then ascending slot
    e_sorted = experts[order]
    logcnt_E = np.bincount(experts, minlength=num_experts)
    start_E = np.cumsum(logcnt_E) - logcnt_E
    log2phy_ER = np.full((num_experts, int(logcnt_E.max(initial=1))), -1, dtype=np.int64)
    log2phy_ER[e_sorted, np.arange(e_sorted.size) - start_E[e_sorted]] = slots[order]
    return log2phy_ER[None], logcnt_E.astype(np.int64)[None]


@dataclass(frozen=True)
class Placement:
    """One layer's physical slots, as read-only NumPy arrays.

    Attributes:
        phy2log_P: logical expert of each physical slot (-1 empty).
        log2phy_ER: slots of each expert in ascending slot order, -1 padded.
        logcnt_E: copies of each expert (home included).
        ep_size: W. experts_per_rank: E_loc. slots_per_rank: S.
        version: plan version (0 = home placement); ranks agree on it every step.
    """

    phy2log_P: np.ndarray
    log2phy_ER: np.ndarray
    logcnt_E: np.ndarray
    ep_size: int
    experts_per_rank: int
    slots_per_rank: int
    version: int = 0

    @property
    def slots_per_rank_total(self) -> int:
        """C = E_loc + S."""
        return self.experts_per_rank + self.slots_per_rank

    @property
    def num_experts(self) -> int:
        return self.ep_size * self.experts_per_rank

    # NOTE: the cached properties below are caches, not fields: ``functools.cached_property``
    # writes the instance's ``__dict__`` directly, which a frozen dataclass allows.
    @functools.cached_property
    def num_replicas(self) -> int:
        return int((self.phy2log_P >= 0).sum()) - self.num_experts

    @functools.cached_property
    def phy_ptr(self) -> int:
        """The address of ``phy2log_P`` (what the compiled control path reads; looked up once)."""
        return self.phy2log_P.ctypes.data

    def replica_slots(self, rank: int) -> np.ndarray:
        """int64 [S]: expert held by each replica slot of ``rank`` (-1 empty)."""
        C = self.slots_per_rank_total
        return self.phy2log_P[rank * C + self.experts_per_rank:(rank + 1) * C]

    def digest(self) -> int:
        """A 62-bit hash of the layout and version, equal on ranks that hold the same placement
        (computed once per placement: the layer sends it every step)."""
        return self._digest

    @functools.cached_property
    def _digest(self) -> int:
        h = hashlib.blake2b(self.phy2log_P.tobytes(), digest_size=8)
        h.update(np.int64(self.version).tobytes())
        return int.from_bytes(h.digest(), "little") >> 2

    def with_version(self, version: int) -> "Placement":
        """The same slots under another version (the read-only slot tables are shared)."""
        return Placement(self.phy2log_P, self.log2phy_ER, self.logcnt_E, self.ep_size, self.experts_per_rank,
                         self.slots_per_rank, version)

    def without(self, drop_P: np.ndarray) -> "Placement":
        """The same placement with the replica slots where ``drop_P`` is True emptied (home slots
        are never dropped; dropping an empty slot changes nothing). ``self`` when nothing changes.
        Same version: the copies that remain are the agreed ones."""
        drop = np.asarray(drop_P, dtype=bool)
        if not drop.any():
            return self
        C = self.slots_per_rank_total
        drop = drop & ((np.arange(self.phy2log_P.size) % C) >= self.experts_per_rank) & (self.phy2log_P >= 0)
        if not drop.any():
            return self
        return Placement.from_phy2log(np.where(drop, -1, self.phy2log_P), self.ep_size, self.experts_per_rank,
                                      self.slots_per_rank, self.version)

    @classmethod
    def from_phy2log(cls, phy2log_P, ep_size: int, experts_per_rank: int, slots_per_rank: int,
                     version: int = 0) -> "Placement":
        phy = np.array(phy2log_P, dtype=np.int64).reshape(-1)
        E = ep_size * experts_per_rank
        if phy.size != ep_size * (experts_per_rank + slots_per_rank):
            raise ValueError(f"phy2log has {phy.size} slots, expected W * (E_loc + S) = "
                             f"{ep_size * (experts_per_rank + slots_per_rank)}")
        built = native.log2phy_of(phy, E)  # compiled where it can be: every new plan builds one
        if built is None:
            if phy.size and (phy.min() < -1 or phy.max() >= E):
                raise ValueError(f"phy2log holds expert ids outside [-1, E={E})")
            log2phy, logcnt = log2phy_of(phy[None], E)
            built = log2phy[0], logcnt[0]
        log2phy, logcnt = built
        for a in (phy, log2phy, logcnt):
            a.setflags(write=False)
        return cls(phy, log2phy, logcnt, ep_size, experts_per_rank, slots_per_rank, version)

    @classmethod
    def home(cls, num_experts: int, ep_size: int, slots_per_rank: int) -> "Placement":
        return cls.from_phy2log(home_phy2log(num_experts, ep_size, slots_per_rank), ep_size,
                                num_experts // ep_size, slots_per_rank)


class Transfer(NamedTuple):
    """One replica's weights: expert ``expert`` from rank ``src`` into replica slot ``slot`` of rank
    ``dst`` (a named tuple: every new plan lists a few dozen of them at W = 64)."""

    expert: int
    src: int
    dst: int
    slot: int


def plan_transfers(old: Optional[Placement], new: Placement) -> List[Transfer]:
    """Replica slots of ``new`` that do not already hold their expert's current weights in
    ``old`` (all of them when ``old`` is None), in ascending physical slot order: the order in
    which both ends post their sends and receives."""
    C, e_loc = new.slots_per_rank_total, new.experts_per_rank
    changed = new.phy2log_P >= 0
    if old is not None:
        changed &= new.phy2log_P != old.phy2log_P
    changed &= (np.arange(new.phy2log_P.size) % C) >= e_loc
    return _transfers(new, np.flatnonzero(changed))


def missing_transfers(new: Placement, valid_P: np.ndarray) -> List[Transfer]:
    """The copies ``new`` needs whose slots do not hold them current (``valid_P`` False, as
    ``replicas.ReplicaTable.valid`` answers: True for home and empty slots), in ascending slot order:
    ``plan_transfers(new.without(~valid_P), new)`` without building that placement."""
    return _transfers(new, np.flatnonzero(~np.asarray(valid_P, dtype=bool)))


def _transfers(new: Placement, slots: np.ndarray) -> List[Transfer]:
    C, e_loc = new.slots_per_rank_total, new.experts_per_rank
    out = []
    for i in slots.tolist():
        e = int(new.phy2log_P[i])
        if e >= 0 and i % C >= e_loc:
            out.append(Transfer(e, e // e_loc, i // C, i % C - e_loc))
    return out
