"""Slot assignment: each route's physical slot among its expert's copies, and its send row.

Why: the split (``split.transport``) says how many of this rank's routes go to each physical
slot; routes to expert e, in route order, fill e's copies in ascending slot order. The PyTorch
path finds each route's slot with an argsort, a bincount, a cumsum and a comparison against the
copies' bounds, then stable-sorts by slot to get the send order: five launches and two sorts.
The kernel does it in one launch without a sort: one program per expert scans the routes in
order, numbers its own routes with a running prefix count, and writes each route's slot, its
row in the send buffer, and the inverse map (send row -> route).

Contract: for every expert, the routes to it equal the sum of ``send_P`` over its copies (what
``dispatch`` guarantees). Then the send buffer is ordered by slot, route order within a slot,
exactly as a stable sort by slot orders it.

Legend: T tokens, K routes per token, L = T * K routes (flattened token-major), E logical
experts, R copies per expert at most, P physical slots, N rows sent (= sum of ``send_P``).
"""

from __future__ import annotations

from typing import Tuple

import torch

from . import HAS_TRITON
from ._launch import check, next_pow2, tuned

__all__ = ["assign_slots", "assign_slots_torch"]

DEFAULTS = {"BLOCK_L": 512, "num_warps": 4}

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _assign_slots_kernel(
        expert_ptr,  # int64 [L] logical expert of each route, -1 = not taken
        send_ptr,  # int64 [P] routes this rank sends to each physical slot
        copies_ptr,  # int64 [E, R] slots of each expert, ascending, -1 padded
        slot_ptr,  # int64 [L] out: physical slot of each route, -1 = not taken
        pos_ptr,  # int64 [L] out: row of each route in the send buffer, -1 = not taken
        order_ptr,  # int64 [N] out: route of each send-buffer row
        L, P, R,
        BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        e = tl.program_id(0)
        pcols = tl.arange(0, BLOCK_P)
        send = tl.load(send_ptr + pcols, mask=pcols < P, other=0)
        rcols = tl.arange(0, BLOCK_R)
        r_ok = rcols < R
        copies = tl.load(copies_ptr + e * R + rcols, mask=r_ok, other=-1)
        size = tl.load(send_ptr + tl.maximum(copies, 0), mask=copies >= 0, other=0)
        bound = tl.cumsum(size, axis=0)  # routes to e held by copies 0..r (inclusive)
        # First send row of each copy's slot: everything sent to lower slots comes before it.
        start = tl.sum(tl.where(pcols[None, :] < copies[:, None], send[None, :], 0), axis=1)
        carry = e * 0
        for off in range(0, L, BLOCK_L):
            idx = off + tl.arange(0, BLOCK_L)
            in_range = idx < L
            ex = tl.load(expert_ptr + idx, mask=in_range, other=-1)
            mine = ex == e
            nth = carry + tl.cumsum(mine.to(tl.int32), axis=0) - 1  # rank among routes to e
            carry += tl.sum(mine.to(tl.int32), axis=0)
            past = (nth[:, None] >= bound[None, :]) & r_ok[None, :]
            copy = tl.minimum(tl.sum(past.to(tl.int32), axis=1), R - 1)
            pick = rcols[None, :] == copy[:, None]
            slot = tl.sum(tl.where(pick, copies[None, :], 0), axis=1)
            before = tl.sum(tl.where(pick, (bound - size)[None, :], 0), axis=1)
            pos = tl.sum(tl.where(pick, start[None, :], 0), axis=1) + nth - before
            tl.store(slot_ptr + idx, slot, mask=mine)
            tl.store(pos_ptr + idx, pos, mask=mine)
            tl.store(order_ptr + pos, idx.to(tl.int64), mask=mine)
            # NOTE: untaken routes belong to no expert's program; the first program marks them.
            if e == 0:
                untaken = in_range & (ex < 0)
                tl.store(slot_ptr + idx, tl.full([BLOCK_L], -1, tl.int64), mask=untaken)
                tl.store(pos_ptr + idx, tl.full([BLOCK_L], -1, tl.int64), mask=untaken)


def _check_sizes(expert_TK: torch.Tensor, send_P: torch.Tensor, copies_ER: torch.Tensor) -> None:
    if expert_TK.dim() != 2 or send_P.dim() != 1 or copies_ER.dim() != 2:
        raise ValueError(f"expected expert_TK [T, K], send_P [P], copies_ER [E, R]; got shapes "
                         f"{tuple(expert_TK.shape)}, {tuple(send_P.shape)}, {tuple(copies_ER.shape)}")


def shape_key(expert_TK: torch.Tensor, send_P: torch.Tensor, copies_ER: torch.Tensor) -> str:
    """The key of this launch's shape in ``tuned.json``."""
    return f"E={copies_ER.shape[0]},R={copies_ER.shape[1]},P={send_P.numel()}"


def assign_slots(expert_TK: torch.Tensor, send_P: torch.Tensor,
                 copies_ER: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Physical slot and send row of every route (Triton).

    Args:
        expert_TK: int64 [T, K] routes (-1 = not taken).
        send_P: int64 [P] routes this rank sends to each physical slot (``send_WP[rank]``).
        copies_ER: int64 [E, R] each expert's slots in ascending order, -1 padded (``log2phy``).

    Returns:
        slot_L int64 [L] (-1 = not taken), pos_L int64 [L] (send row, -1 = not taken),
        order_N int64 [N] (route of each send row; ``order_N[pos_L[l]] == l``).
    """
    _check_sizes(expert_TK, send_P, copies_ER)
    device = expert_TK.device
    for name, t in (("expert_TK", expert_TK), ("send_P", send_P), ("copies_ER", copies_ER)):
        check(name, t, (torch.int64,), t.dim(), device)
    flat = expert_TK.reshape(-1).contiguous()
    L, P = flat.numel(), send_P.numel()
    E, R = copies_ER.shape
    # NOTE: the one host sync: the send buffer's length. dispatch knows it already, on the host.
    N = int(send_P.sum()) if P else 0
    slot_L = torch.empty(L, dtype=torch.int64, device=device)
    pos_L = torch.empty(L, dtype=torch.int64, device=device)
    order_N = torch.empty(N, dtype=torch.int64, device=device)
    if L == 0:
        return slot_L, pos_L, order_N
    if E == 0:
        raise ValueError("copies_ER has no experts but routes were given")
    cfg = tuned("assign_slots", device, shape_key(expert_TK, send_P, copies_ER), DEFAULTS)
    _assign_slots_kernel[(E,)](flat, send_P.contiguous(), copies_ER.contiguous(), slot_L, pos_L, order_N, L, P, R,
                               BLOCK_L=cfg["BLOCK_L"], BLOCK_P=next_pow2(P), BLOCK_R=next_pow2(R),
                               num_warps=cfg["num_warps"])
    return slot_L, pos_L, order_N


def assign_slots_torch(expert_TK: torch.Tensor, send_P: torch.Tensor,
                       copies_ER: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch twin of ``assign_slots`` (same arguments and results)."""
    _check_sizes(expert_TK, send_P, copies_ER)
    flat = expert_TK.reshape(-1)
    E, R = copies_ER.shape
    taken = flat >= 0
    e = flat.clamp_min(0)
    # Rank of each route among this rank's routes to its expert (stable by route order).
    order = torch.argsort(torch.where(taken, e, E), stable=True)
    counts = torch.bincount(e[taken], minlength=E)
    start = torch.cumsum(counts, 0) - counts
    nth = torch.empty_like(flat)
    nth[order] = torch.arange(flat.numel(), device=flat.device)
    nth = nth - start[e]
    sizes_ER = torch.where(copies_ER >= 0, send_P[copies_ER.clamp_min(0)], torch.zeros_like(copies_ER))
    bound_ER = torch.cumsum(sizes_ER, dim=1)
    copy = (nth.unsqueeze(1) >= bound_ER[e]).sum(dim=1)
    slot_L = torch.where(taken, copies_ER[e, copy.clamp_max(R - 1)], torch.full_like(flat, -1))
    # NOTE: a stable sort by slot groups rows by destination rank (slots are rank-major) and keeps
    # route order within a slot, which is what the receiver's counts assume.
    order_N = torch.argsort(torch.where(taken, slot_L, send_P.numel()), stable=True)[: int(taken.sum())]
    pos_L = torch.full_like(flat, -1)
    pos_L[order_N] = torch.arange(order_N.numel(), device=flat.device)
    return slot_L, pos_L, order_N
