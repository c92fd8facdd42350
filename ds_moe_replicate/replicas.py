"""Replica slot weights on this rank, and their prefetch from the experts' home ranks.

Each rank has S replica slots. A slot's weights live in flat rows of ``buffers [2, S, numel]``
(plain tensors, not parameters, so ``state_dict`` keeps exactly the stock keys). When a new plan
is made, every slot whose expert changes receives that expert's weights from its home rank by
point-to-point transfer into its spare buffer while the current step computes; at the start of the
next step the ranks agree (in the step's all-gather) whether every transfer has landed; if so the
received slots switch to the new weights, otherwise the old plan serves one more step. A replica
is therefore never read before its weights have arrived, and every rank switches plans at the
same step.

Legend: S replica slots per rank, C slots per rank (E_loc + S).
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .comm import global_rank
from .placement import Placement, Transfer

__all__ = ["ReplicaStore"]


class ReplicaStore:
    """The replica slots of one layer on this rank.

    Two weight buffers per slot: the current one (read by the experts) and the other one (where
    the next plan's weights arrive). Landing a prefetch flips the received slots, so no copy is
    made and a replica never reads weights still in flight.
    """

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
        self.buffers: Optional[torch.Tensor] = None  # [2, S, numel]
        self.current = np.zeros(num_slots, dtype=np.int64)
        self._views: List[List[Dict[str, torch.Tensor]]] = []
        self._pending: Optional[_Pending] = None

    @property
    def bytes_per_replica(self) -> int:
        return self.numel * (self.buffers.element_size() if self.buffers is not None else 4)

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def ensure(self, like: torch.Tensor) -> None:
        """Allocate the slots on ``like``'s device and dtype (again if the model moved)."""
        if self.buffers is not None and self.buffers.device == like.device and self.buffers.dtype == like.dtype:
            return
        if self._pending is not None:
            raise RuntimeError("the model moved device or dtype while replica weights were in flight")
        self.buffers = torch.zeros(2, self.num_slots, self.numel, device=like.device, dtype=like.dtype)
        self._views = [[self._named(self.buffers[b, s]) for s in range(self.num_slots)] for b in range(2)]

    def _named(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        chunks = torch.split(flat, self.numels)
        return {n: c.view(shape) for n, c, shape in zip(self.names, chunks, self.shapes)}

    def params(self, slot: int) -> Dict[str, torch.Tensor]:
        """Views of the weights in replica slot ``slot``, named as the expert's parameters."""
        return self._views[int(self.current[slot])][slot]

    def run(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(self.template, self.params(slot), (x,))
        return out[0] if isinstance(out, tuple) else out

    @staticmethod
    def flatten(expert: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in expert.parameters()])

    def start(self, transfers: Sequence[Transfer], new: Placement, home_experts: Sequence[nn.Module], rank: int,
              group) -> int:
        """Post the sends and receives of ``transfers`` for this rank; they progress in the
        background until ``poll``/``land``.

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
                target = self.buffers[1 - int(self.current[t.slot]), t.slot]
                reqs.append(dist.irecv(target, src=global_rank(group, t.src), group=group))
                slots.append(t.slot)
            elif t.src == rank:
                if t.expert not in flat_of:
                    flat_of[t.expert] = self.flatten(home_experts[t.expert - rank * e_loc]).to(self.buffers.dtype)
                keep.append(flat_of[t.expert])
                reqs.append(dist.isend(flat_of[t.expert], dst=global_rank(group, t.dst), group=group))
        self._pending = _Pending(new, reqs, slots, keep, self.buffers.device)
        return len(slots) * self.bytes_per_replica

    def poll(self) -> bool:
        """True when nothing is in flight on this rank (every send and receive finished)."""
        return self._pending is None or self._pending.done.is_set()

    def land(self) -> Tuple[Optional[Placement], float]:
        """Finish the transfers in flight (waiting if needed) and make their weights current.

        Returns:
            (the placement that is now active, or None if nothing was in flight; ms waited).
        """
        if self._pending is None:
            return None, 0.0
        pending, self._pending = self._pending, None
        t0 = time.perf_counter()
        pending.wait()
        waited_ms = (time.perf_counter() - t0) * 1e3
        self.current[pending.slots] = 1 - self.current[pending.slots]
        return pending.placement, waited_ms


class _Pending:
    """Requests of one prefetch, waited for on a background thread so that ``poll`` can tell
    when they are done (gloo's requests do not report completion until waited on)."""

    def __init__(self, placement: Placement, reqs: list, slots: List[int], keep: list, device: torch.device) -> None:
        self.placement, self.reqs, self.slots, self.keep, self.device = placement, reqs, slots, keep, device
        self.done = threading.Event()
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._wait_all, daemon=True)
        self._thread.start()
        _IN_FLIGHT.add(self)

    def _wait_all(self) -> None:
        try:
            if self.device.type == "cuda":
                # NOTE: a new thread starts on device 0; the wait must order this rank's stream.
                torch.cuda.set_device(self.device)
            for req in self.reqs:
                req.wait()
        except BaseException as err:  # noqa: BLE001 - re-raised by wait() on the caller's thread
            self.error = err
        finally:
            self.done.set()

    def wait(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"replica weight transfer failed: {self.error}") from self.error


_IN_FLIGHT: "weakref.WeakSet[_Pending]" = weakref.WeakSet()


@atexit.register
def finish_in_flight() -> None:
    """Wait (10 s at most each) for replica transfers still in flight; called at exit."""
    # NOTE: a transfer still in flight when the interpreter exits would leave its waiting thread
    # inside the communication library during teardown (the process then aborts); give the
    # transfers (normally done already) a bounded time to finish.
    for pending in list(_IN_FLIGHT):
        pending._thread.join(timeout=10.0)
