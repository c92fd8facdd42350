"""Replica slots of one layer on this rank, for steps without gradients (inference).

Each rank has S replica slots, one weight buffer each (``buffers [S, numel]``: a slot costs the
memory of one expert). Their weights are prefetched from the experts' home ranks by point-to-point
transfers that overlap compute. A slot is refilled only while nothing reads it: transfers start
after the layer's experts ran (history plans) or before the layer runs (lookahead plans), and a
slot in flight serves no tokens until every rank has reported, in a step's all-gather, that its
transfers landed.

Every rank keeps the same table of all W * S replica slots (``ReplicaTable``): which expert each
holds and at which weights versions (of the expert's home rank and of the holder) it was copied.
Home versions travel in each step's all-gather, so every rank derives the same set of valid
copies; a copy whose home weights (or holder) changed since it was made serves nothing until
refreshed (docs/design.md, "Never stale").

Completion (docs/design.md, "GPU-correct"): on CUDA a transfer has landed when every request's
``is_completed()`` is true (NCCL reports it once the kernel that wrote the buffer finished); on
gloo a background thread waits for the requests (gloo reports completion only to a waiter).

Legend: S replica slots per rank, W ranks, C = E_loc + S slots per rank, P = W * C.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import native
from .comm import global_rank
from .placement import Placement, Transfer

__all__ = ["ReplicaStore", "ReplicaTable", "ExpertLayout", "flatten_expert"]


class ExpertLayout:
    """How an expert's parameters lie in one flat row (refuses experts that cannot be copied)."""

    def __init__(self, template: nn.Module) -> None:
        params = list(template.named_parameters())
        if any(True for _ in template.buffers()):
            raise NotImplementedError("replicating experts with buffers is not supported; "
                                      "set moe_replication.slots_per_rank to 0 for this layer")
        dtypes = {p.dtype for _, p in params}
        if len(dtypes) > 1:
            raise NotImplementedError(f"replicated experts need one parameter dtype, found {sorted(map(str, dtypes))}")
        self.names = [n for n, _ in params]
        self.shapes = [p.shape for _, p in params]
        self.numels = [p.numel() for _, p in params]
        self.numel = sum(self.numels)

    def named(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Views of a flat row, named as the expert's parameters."""
        chunks = torch.split(flat, self.numels)
        return {n: c.view(shape) for n, c, shape in zip(self.names, chunks, self.shapes)}


def flatten_expert(expert: nn.Module) -> torch.Tensor:
    """The expert's parameters as one flat tensor (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in expert.parameters()])


class ReplicaTable:
    """What every replica slot of the group holds; the same on every rank.

    Attributes:
        expert_P: expert whose weights the slot holds (-1 none).
        home_version_P / holder_version_P: the weights versions of the expert's home rank and of
            the holder when the copy was made.
    """

    def __init__(self, num_slots: int) -> None:
        self.expert_P = np.full(num_slots, -1, dtype=np.int64)
        self.home_version_P = np.zeros(num_slots, dtype=np.int64)
        self.holder_version_P = np.zeros(num_slots, dtype=np.int64)
        self._pending = None
        self._changes = 0  # bumped by every change of the table (what ``valid``'s cache keys on)
        self._valid_cache: tuple = (None, None, -1, None)

    def begin(self, transfers: Sequence[Transfer], placement: Placement, version_W: np.ndarray) -> None:
        """Copies of ``transfers`` started (at weights versions ``version_W``): their slots hold
        nothing usable until ``commit``."""
        self.forget(transfers, placement)
        self._pending = (list(transfers), placement, np.array(version_W))

    def cancel(self) -> None:
        """The copies in flight were discarded (their slots stay empty)."""
        self._pending = None

    def commit(self) -> None:
        """Every rank's copies in flight landed."""
        if self._pending is not None:
            self.record(*self._pending)
            self._pending = None

    def record(self, transfers: Sequence[Transfer], placement: Placement, version_W: np.ndarray) -> None:
        self._changes += 1
        C, e_loc = placement.slots_per_rank_total, placement.experts_per_rank
        for t in transfers:
            p = t.dst * C + e_loc + t.slot
            self.expert_P[p] = t.expert
            self.home_version_P[p] = version_W[t.src]
            self.holder_version_P[p] = version_W[t.dst]

    def forget(self, transfers: Sequence[Transfer], placement: Placement) -> None:
        """The slots of ``transfers`` are being overwritten: they hold nothing usable."""
        self._changes += 1
        C, e_loc = placement.slots_per_rank_total, placement.experts_per_rank
        for t in transfers:
            self.expert_P[t.dst * C + e_loc + t.slot] = -1

    def valid(self, placement: Placement, version_W: np.ndarray) -> np.ndarray:
        """bool [P]: slots of ``placement`` whose copy is resident and current (home slots and
        empty slots: True).

        Asked every step with the same placement, table and versions most of the time (versions
        change with the weights, the table with transfers): the last answer is kept."""
        versions = np.asarray(version_W).tobytes()
        last_placement, last_versions, last_changes, last = self._valid_cache
        if last_placement is placement and last_changes == self._changes and last_versions == versions:
            return last
        ok = self._valid(placement, version_W)
        ok.setflags(write=False)
        self._valid_cache = (placement, versions, self._changes, ok)
        return ok

    def _valid(self, placement: Placement, version_W: np.ndarray) -> np.ndarray:
        ok = native.valid_slots(self.expert_P, self.home_version_P, self.holder_version_P, placement, version_W)
        return ok if ok is not None else self._valid_numpy(placement, version_W)

    def _valid_numpy(self, placement: Placement, version_W: np.ndarray) -> np.ndarray:
        """``_valid`` in NumPy: the twin of ``native.valid_slots``."""
        C, e_loc = placement.slots_per_rank_total, placement.experts_per_rank
        P = placement.phy2log_P.size
        rank_P = np.arange(P) // C
        home_P = np.where(placement.phy2log_P >= 0, placement.phy2log_P // max(e_loc, 1), 0)
        ok = ((self.expert_P == placement.phy2log_P) & (self.home_version_P == version_W[home_P])
              & (self.holder_version_P == version_W[rank_P]))
        # NOTE: an empty slot needs no copy; counting it invalid made every step after a plan that
        # emptied a slot rebuild the serving placement and re-request the same copies.
        return ok | ((np.arange(P) % C) < e_loc) | (placement.phy2log_P < 0)


class ReplicaStore:
    """The replica slot buffers of one layer on this rank and their transfers in flight."""

    def __init__(self, template: nn.Module, num_slots: int, timeout_s: float = 300.0) -> None:
        self.template = template
        self.num_slots = num_slots
        self.timeout_s = timeout_s
        self.layout = ExpertLayout(template)
        self.names, self.numel = self.layout.names, self.layout.numel
        self.buffers: Optional[torch.Tensor] = None  # [S, numel]
        self._views: List[Dict[str, torch.Tensor]] = []
        self.pending: Optional[_Pending] = None

    @property
    def bytes_per_replica(self) -> int:
        return self.numel * (self.buffers.element_size() if self.buffers is not None else 4)

    @property
    def in_flight(self) -> bool:
        return self.pending is not None

    def ensure(self, like: torch.Tensor) -> None:
        """Allocate the slots on ``like``'s device and dtype."""
        if self.buffers is not None and self.buffers.device == like.device and self.buffers.dtype == like.dtype:
            return
        self.reset()
        self.buffers = torch.zeros(self.num_slots, self.numel, device=like.device, dtype=like.dtype)
        self._views = [self.layout.named(self.buffers[s]) for s in range(self.num_slots)]

    def reset(self, wait: bool = True) -> None:
        """Drop the buffers (the model moved or changed). A transfer in flight is finished first
        (``wait``: its peer posted the matching request, so it completes, within ``timeout_s``)
        or abandoned (after a failed step; its tag is never reused), and its weights discarded."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            if wait:
                try:
                    pending.wait(self.timeout_s)
                except Exception:  # noqa: BLE001 - the copies are discarded either way
                    pass
        self.buffers, self._views = None, []

    def params(self, slot: int) -> Dict[str, torch.Tensor]:
        """Views of the weights in replica slot ``slot``, named as the expert's parameters."""
        return self._views[slot]

    def start(self, transfers: Sequence[Transfer], home_experts: Sequence[nn.Module], rank: int, group,
              experts_per_rank: int, tag: int = 0) -> int:
        """Post this rank's sends and receives of ``transfers``; they progress in the background.

        Args:
            transfers: every transfer of the re-plan (the same list on every rank).
            home_experts: this rank's home expert modules, in local order.
            rank: this rank in ``group``.
            experts_per_rank: E_loc.
            tag: the point-to-point tag of this transfer (the same on every rank).

        Returns:
            Bytes this rank receives.
        """
        if self.pending is not None:
            raise RuntimeError("a replica prefetch is already in flight")
        reqs, keep, received = [], [], 0
        flat_of: Dict[int, torch.Tensor] = {}
        for t in transfers:
            if t.dst == rank:
                reqs.append(dist.irecv(self.buffers[t.slot], src=global_rank(group, t.src), group=group, tag=tag))
                received += self.bytes_per_replica
            elif t.src == rank:
                if t.expert not in flat_of:
                    flat = flatten_expert(home_experts[t.expert - rank * experts_per_rank]).to(self.buffers.dtype)
                    flat_of[t.expert] = flat
                keep.append(flat_of[t.expert])
                reqs.append(dist.isend(flat_of[t.expert], dst=global_rank(group, t.dst), group=group, tag=tag))
        self.pending = _Pending(reqs, keep, self.buffers.device)
        return received

    def poll(self) -> bool:
        """True when nothing is in flight on this rank (every send and receive finished).

        Raises:
            TimeoutError: a transfer has been in flight longer than ``timeout_s``.
        """
        if self.pending is None or self.pending.done():
            return True
        if time.monotonic() - self.pending.started > self.timeout_s:
            raise TimeoutError(f"replica weight transfer in flight for more than {self.timeout_s:.0f} s "
                               "(moe_replication.timeout_s)")
        return False

    def land(self) -> float:
        """Finish the transfers in flight (waiting at most ``timeout_s``); returns ms waited."""
        if self.pending is None:
            return 0.0
        pending, self.pending = self.pending, None
        t0 = time.perf_counter()
        pending.wait(self.timeout_s)
        return (time.perf_counter() - t0) * 1e3


class _Pending:
    """Requests of one prefetch and how to tell that they finished (see the module docstring)."""

    def __init__(self, reqs: list, keep: list, device: torch.device) -> None:
        self.reqs, self.keep, self.device = reqs, keep, device
        self.started = time.monotonic()
        self.error: Optional[BaseException] = None
        self._event = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if device.type != "cuda":
            self._thread = threading.Thread(target=self._wait_all, daemon=True)
            self._thread.start()
            _IN_FLIGHT.add(self)

    def _wait_all(self) -> None:
        try:
            for req in self.reqs:
                req.wait()
        except BaseException as err:  # noqa: BLE001 - re-raised by wait() on the caller's thread
            self.error = err
        finally:
            self._event.set()

    def done(self) -> bool:
        if self._thread is None:
            return all(req.is_completed() for req in self.reqs)
        return self._event.is_set()

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        if self._thread is None:
            while not self.done():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replica weight transfer did not finish within {timeout_s:.0f} s "
                                       "(moe_replication.timeout_s)")
                time.sleep(1e-4)
            return
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"replica weight transfer did not finish within {timeout_s:.0f} s "
                               "(moe_replication.timeout_s)")
        if self.error is not None:
            raise RuntimeError(f"replica weight transfer failed: {self.error}") from self.error


_IN_FLIGHT: "weakref.WeakSet[_Pending]" = weakref.WeakSet()


@atexit.register
def finish_in_flight() -> None:
    """Wait (10 s at most each) for replica transfers still in flight; called at exit."""
    # NOTE: a transfer still in flight when the interpreter exits would leave its waiting thread
    # inside the communication library during teardown (the process then aborts).
    for pending in list(_IN_FLIGHT):
        if pending._thread is not None:
            pending._thread.join(timeout=10.0)
