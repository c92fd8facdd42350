"""Replica slot weights on this rank, and their prefetch from the experts' home ranks.

Each rank has S replica slots. A slot's weights live in one flat row of ``active [S, numel]``
(plain tensors, not parameters, so ``state_dict`` keeps exactly the stock keys). When a new plan
is made, every slot whose expert changes receives that expert's weights from its home rank by
point-to-point transfer into ``staging`` while the current step computes; at the start of the
next step ``land()`` waits for the transfers (the only time measured) and copies staging into
active. A replica is therefore never read before its weights have arrived, and every rank
switches plans at the same step.

Legend: S replica slots per rank, C slots per rank (E_loc + S).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .comm import global_rank
from .dispatch import Placement

__all__ = ["ReplicaStore", "Transfer", "plan_transfers"]


@dataclass(frozen=True)
class Transfer:
    """One replica's weights: expert ``expert`` from rank ``src`` into slot ``slot`` of rank ``dst``."""

    expert: int
    src: int
    dst: int
    slot: int


def plan_transfers(old: Placement, new: Placement) -> List[Transfer]:
    """Replica slots whose expert changes, in ascending physical slot order (the order in which
    both ends post their sends and receives)."""
    C, e_loc = new.slots_per_rank_total, new.experts_per_rank
    p = np.nonzero((new.phy2log_P >= 0) & (new.phy2log_P != old.phy2log_P))[0]
    return [Transfer(int(new.phy2log_P[i]), int(new.phy2log_P[i]) // e_loc, int(i) // C, int(i) % C - e_loc)
            for i in p]


class ReplicaStore:
    """The replica slots of one layer on this rank."""

    def __init__(self, template: nn.Module, num_slots: int) -> None:
        params = list(template.named_parameters())
        if any(True for _ in template.buffers()):
            raise NotImplementedError("replicating experts with buffers is not supported; "
                                      "set moe_replication.slots_per_rank to 0 for this layer")
        dtypes = {p.dtype for _, p in params}
        if len(dtypes) > 1:
            raise NotImplementedError(f"replicated experts need one parameter dtype, found {sorted(map(str, dtypes))}")
        self.template = template
        self.num_slots = num_slots
        self.names = [n for n, _ in params]
        self.shapes = [p.shape for _, p in params]
        self.numels = [p.numel() for _, p in params]
        self.numel = sum(self.numels)
        self.active: Optional[torch.Tensor] = None
        self.staging: Optional[torch.Tensor] = None
        self._views: List[Dict[str, torch.Tensor]] = []
        self._pending: Optional[Tuple[Placement, list, List[int], list]] = None

    @property
    def bytes_per_replica(self) -> int:
        return self.numel * (self.active.element_size() if self.active is not None else 4)

    def ensure(self, like: torch.Tensor) -> None:
        """Allocate the slots on ``like``'s device and dtype (again if the model moved)."""
        if self.active is not None and self.active.device == like.device and self.active.dtype == like.dtype:
            return
        if self._pending is not None:
            raise RuntimeError("the model moved device or dtype while replica weights were in flight")
        self.active = torch.zeros(self.num_slots, self.numel, device=like.device, dtype=like.dtype)
        self.staging = torch.zeros_like(self.active)
        self._views = []
        for s in range(self.num_slots):
            chunks = torch.split(self.active[s], self.numels)
            self._views.append({n: c.view(shape) for n, c, shape in zip(self.names, chunks, self.shapes)})

    def params(self, slot: int) -> Dict[str, torch.Tensor]:
        """Views of the weights in replica slot ``slot``, named as the expert's parameters."""
        return self._views[slot]

    def run(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(self.template, self.params(slot), (x,))
        return out[0] if isinstance(out, tuple) else out

    @staticmethod
    def flatten(expert: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in expert.parameters()])

    def start(self, transfers: Sequence[Transfer], new: Placement, home_experts: Sequence[nn.Module], rank: int,
              group) -> int:
        """Post the sends and receives of ``transfers`` for this rank; ``land()`` finishes them.

        Args:
            transfers: every transfer of the re-plan (the same list on every rank).
            new: the placement that becomes active once they land.
            home_experts: this rank's home expert modules, in local order.
            rank: this rank in ``group``.

        Returns:
            Bytes this rank receives.
        """
        if self._pending is not None:
            raise RuntimeError("a replica prefetch is already in flight")
        e_loc = new.experts_per_rank
        reqs, slots, keep = [], [], []
        flat_of: Dict[int, torch.Tensor] = {}
        for t in transfers:
            if t.dst == rank:
                reqs.append(dist.irecv(self.staging[t.slot], src=global_rank(group, t.src), group=group))
                slots.append(t.slot)
            elif t.src == rank:
                if t.expert not in flat_of:
                    flat_of[t.expert] = self.flatten(home_experts[t.expert - rank * e_loc]).to(self.active.dtype)
                keep.append(flat_of[t.expert])
                reqs.append(dist.isend(flat_of[t.expert], dst=global_rank(group, t.dst), group=group))
        self._pending = (new, reqs, slots, keep)
        return len(slots) * self.bytes_per_replica

    def land(self) -> Tuple[Optional[Placement], float]:
        """Wait for the transfers in flight and make their weights active.

        Returns:
            (the placement that is now active, or None if nothing was in flight; ms waited).
        """
        if self._pending is None:
            return None, 0.0
        new, reqs, slots, _ = self._pending
        t0 = time.perf_counter()
        for req in reqs:
            req.wait()
        waited_ms = (time.perf_counter() - t0) * 1e3
        for s in slots:
            self.active[s].copy_(self.staging[s])
        self._pending = None
        return new, waited_ms
