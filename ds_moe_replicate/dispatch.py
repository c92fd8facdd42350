"""Permute, all-to-all and combine for a layer whose experts may have several copies.

Contract (Megatron-style): ``dispatch()`` does the local preprocess (assign each route to a
physical slot, permute rows into send order), one uneven all-to-all, and groups the received
rows by local slot; it returns the rows and a frozen ``DispatchMeta`` that ``combine()`` consumes
for the reverse exchange, un-permute and gate-weighted sum over k.

The split (``split.transport_rank`` / ``split.capacity_transport``) is derived on every rank from
the same gathered counts, so every rank knows its send and receive sizes without another
collective: of ``send_WP[w, p]`` (routes from rank w computed by physical slot p) a rank needs
only its own row and its own slots' columns (``split.RankSplit``).

Legend: T tokens on this rank, H hidden, K routes per token (top-k), E logical experts,
W ranks, S replica slots per rank, C = E_loc + S slots per rank, P = W * C physical slots,
R copies per expert at most, N routes sent by this rank, M rows received by this rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from . import ops
from .comm import all_to_all
from .placement import Placement
from .split import RankSplit

__all__ = ["DispatchMeta", "dispatch", "combine"]


@dataclass(frozen=True)
class DispatchMeta:
    """What ``combine`` needs to bring expert outputs back to token order.

    Attributes:
        order_N: index into the flattened [T * K] routes of each sent row, in send order.
        pos_TK: send row of each route (-1 = not taken); the inverse of ``order_N``.
        send_W / recv_W: rows sent to / received from each rank.
        group_M: receive-order index of each row in slot-grouped order.
        slot_rows_C: rows per local physical slot (grouped order is slot by slot).
        num_tokens, k: T and K of this rank.
        error: what failed in this rank's local preprocess (it then sent placeholder rows of the
            agreed sizes, so that no rank is left waiting), or None.
    """

    order_N: torch.Tensor
    pos_TK: torch.Tensor
    send_W: List[int]
    recv_W: List[int]
    group_M: Optional[torch.Tensor]
    slot_rows_C: List[int]
    num_tokens: int
    k: int
    error: Optional[BaseException] = None


def _route_slots(expert_TK: torch.Tensor, send_P: torch.Tensor, copies_ER: torch.Tensor) -> torch.Tensor:
    """Physical slot of each route of this rank (-1 where not taken).

    Routes to expert e, in route order, fill e's copies in ascending slot order, ``send_P[p]``
    routes each. int64 [T * K]. (The slot part of ``kernels.assign_slots_torch``.)
    """
    return ops.assign_slots(expert_TK, send_P, copies_ER, kernels="torch")[0]


def dispatch(x_TH: torch.Tensor, expert_TK: torch.Tensor, split: RankSplit, placement: Placement, group, *,
             kernels: str = "torch"):
    """Send every taken route's row to the physical slot the split gave it.

    Args:
        x_TH: [T, H] this rank's tokens. expert_TK: int64 [T, K] routes (-1 = not taken); must
            agree with ``split.send_P`` (routes per expert = sum over its copies).
        split: this rank's ``RankSplit`` (``transport_rank``, or ``RankSplit.of_dense`` of
            ``capacity_transport``).
        placement: the active placement.
        kernels: ``moe_replication.kernels``: who runs slot assignment and permutation (``ops``).

    Returns:
        (rows_MH grouped by local slot, DispatchMeta).
    """
    W = placement.ep_size
    C = placement.slots_per_rank_total
    T, K = expert_TK.shape
    device = x_TH.device
    send_W = split.send_P.reshape(W, C).sum(axis=1).tolist()
    mine_WC = split.recv_WC
    recv_W = mine_WC.sum(axis=1).tolist()
    error = None
    try:
        send_P = torch.from_numpy(split.send_P).to(device)
        copies_ER = torch.from_numpy(placement.log2phy_ER.copy()).to(device)
        # Send order: by physical slot (so by destination rank), route order within a slot.
        _, pos_L, order_N = ops.assign_slots(expert_TK, send_P, copies_ER, kernels=kernels)
        x_send = ops.permute(x_TH, order_N, K, kernels=kernels)
        if x_send.shape[0] != sum(send_W):
            raise RuntimeError(f"routes ({x_send.shape[0]}) disagree with the split ({sum(send_W)} rows)")
    except Exception as err:  # noqa: BLE001 - reported to every rank through combine
        # NOTE: the sizes come from the gathered counts, so the exchange still matches.
        error = err
        x_send = x_TH.new_zeros((sum(send_W), x_TH.shape[1]))
        pos_L = torch.full((T * K,), -1, dtype=torch.int64, device=device)
        order_N = torch.zeros(sum(send_W), dtype=torch.int64, device=device)
    x_recv = all_to_all(x_send, send_W, recv_W, group)
    group_M = None
    if W > 1:
        # Received rows are ordered (source, slot); experts want them (slot, source).
        start_WC = (np.cumsum(mine_WC.reshape(-1)) - mine_WC.reshape(-1)).reshape(W, C)
        rows = [np.arange(start_WC[w, c], start_WC[w, c] + mine_WC[w, c]) for c in range(C) for w in range(W)]
        group_M = torch.from_numpy(np.concatenate(rows) if rows else np.zeros(0, np.int64)).to(device)
        try:
            x_recv = ops.permute(x_recv, group_M, 1, kernels=kernels)
        except Exception as err:  # noqa: BLE001 - reported to every rank through combine
            error = error or err
            x_recv = torch.zeros_like(x_recv)
    meta = DispatchMeta(order_N, pos_L.view(T, K), send_W, recv_W, group_M, mine_WC.sum(axis=0).tolist(), T, K,
                        error)
    return x_recv, meta


def combine(y_MH: torch.Tensor, weight_TK: torch.Tensor, meta: DispatchMeta, group, failed: int = 0, *,
            kernels: str = "torch"):
    """Reverse of ``dispatch``: expert outputs back to their tokens, gate-weighted, summed over k.

    The exchange carries one status row per rank pair, so a rank whose experts failed still
    completes the collective and every rank learns of it (no rank is left waiting).

    Args:
        y_MH: [M, H] expert outputs in the grouped order ``dispatch`` returned.
        weight_TK: fp32 [T, K] combine weights (any value where a route was not taken).
        failed: this rank's failure code (``comm.FAILURES``; 0 = fine; ``y_MH`` then holds
            placeholders).
        kernels: ``moe_replication.kernels``: who runs the weighted un-permute (``ops.combine``).

    Returns:
        ([T, H] in ``y_MH``'s dtype, every rank's failure code). The weighting and the sum over
        k run in fp32, as DeepSpeed's.
    """
    H = y_MH.shape[1]
    W = len(meta.send_W)
    codes_W = [int(failed)]
    if W > 1:
        back = torch.empty_like(y_MH)
        back[meta.group_M] = y_MH
        status = y_MH.new_full((1, H), float(failed))
        chunks = torch.split(back, meta.recv_W)
        y_back = all_to_all(torch.cat([t for c in chunks for t in (status, c)]),
                            [n + 1 for n in meta.recv_W], [n + 1 for n in meta.send_W], group)
        heads = torch.from_numpy(np.cumsum([0] + [n + 1 for n in meta.send_W[:-1]])).to(y_back.device)
        codes_W = [int(c) for c in y_back[heads, 0].round().tolist()]
        keep = torch.ones(y_back.shape[0], dtype=torch.bool, device=y_back.device)
        keep[heads] = False
        y_N = y_back[keep]
    else:
        y_N = y_MH
    return ops.combine(y_N, weight_TK, meta.pos_TK, kernels=kernels), codes_W
