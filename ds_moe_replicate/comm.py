"""Communication for the replicated layer: the one adapter to DeepSpeed's process groups, the
gathered-counts collective that doubles as an error agreement, and an uneven all-to-all.

Every collective here is issued by every rank of the expert-parallel group in the same order.
An error found before the first collective of a step is not raised on the spot (the other ranks
would wait forever in their all-gather): it travels in the all-gather as a status flag, and every
rank raises ``ReplicationError`` naming the rank(s) that failed.

Legend: W expert-parallel ranks, E logical experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

import torch
import torch.distributed as dist

__all__ = ["ReplicationError", "expert_parallel_group", "group_size", "group_rank", "global_rank",
           "Gathered", "gather_step", "all_to_all"]

_STATUS_OK, _STATUS_FAILED = 0, 1


class ReplicationError(RuntimeError):
    """A step of the replicated layer failed on at least one expert-parallel rank."""


def expert_parallel_group(ep_size: int, use_data_before_expert_parallel: bool = False):
    """The expert-parallel group of this rank for ``ep_size``, created through DeepSpeed if needed.

    The only place that calls DeepSpeed's private ``groups._*`` API.
    """
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel)
    return groups._get_expert_parallel_group(name)


def group_size(group) -> int:
    return 1 if group is None or not dist.is_initialized() else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None or not dist.is_initialized() else dist.get_rank(group)


def global_rank(group, rank_in_group: int) -> int:
    """Global rank of a rank of ``group`` (point-to-point calls take global ranks)."""
    return rank_in_group if group is None else dist.get_global_rank(group, rank_in_group)


@dataclass(frozen=True)
class Gathered:
    """What every rank learns from a step's all-gather (identical on every rank).

    Attributes:
        counts_WE: int64 [W, E] routes per rank and expert of this layer.
        tokens_W: int64 [W] tokens per rank.
        landed_W: bool [W] each rank's replica transfers in flight have all finished.
        lookahead_WE: int64 [W, E'] predicted routes for the next layer, or None.
    """

    counts_WE: np.ndarray
    tokens_W: np.ndarray
    landed_W: np.ndarray
    lookahead_WE: Optional[np.ndarray]


def gather_step(counts_E: torch.Tensor, tokens: int, error: Optional[BaseException], group, landed: bool = True,
                lookahead_E: Optional[torch.Tensor] = None) -> Gathered:
    """All-gather every rank's routes per expert, token count, landing flag, status and lookahead.

    Args:
        counts_E: int64 [E] routes per logical expert on this rank (zeros if ``error``).
        tokens: tokens on this rank.
        error: an exception this rank hit before the collective, or None.
        group: the expert-parallel group (None or size 1: no communication).
        landed: this rank has no replica transfer still in flight.
        lookahead_E: int64 [E'] predicted routes of the next layer (the same length on every
            rank; zeros if ``error``), or None.

    Raises:
        ReplicationError on every rank if any rank passed an error.
    """
    parts = [counts_E.reshape(-1).to(torch.int64)]
    if lookahead_E is not None:
        parts.append(lookahead_E.reshape(-1).to(torch.int64).to(counts_E.device))
    tail = torch.tensor([tokens, int(landed), _STATUS_FAILED if error is not None else _STATUS_OK],
                        dtype=torch.int64, device=counts_E.device)
    payload = torch.cat(parts + [tail])
    W = group_size(group)
    if W > 1:
        out = torch.empty(W * payload.numel(), dtype=torch.int64, device=payload.device)
        dist.all_gather_into_tensor(out, payload, group=group)
        out = out.view(W, -1)
    else:
        out = payload.unsqueeze(0)
    out = out.cpu().numpy()
    failed: List[int] = np.nonzero(out[:, -1] != _STATUS_OK)[0].tolist()
    if failed:
        me = group_rank(group)
        if error is not None:
            raise ReplicationError(f"expert-parallel rank {me} failed: {error}") from error
        raise ReplicationError(f"expert-parallel rank(s) {failed} failed in this step (see their error); "
                               f"rank {me} stops too instead of waiting")
    E = counts_E.numel()
    lookahead = out[:, E:-3] if lookahead_E is not None else None
    return Gathered(out[:, :E], out[:, -3], out[:, -2].astype(bool), lookahead)


class _AllToAll(torch.autograd.Function):
    """Uneven ``all_to_all_single``; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=list(recv),
                               input_split_sizes=list(send), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group) -> torch.Tensor:
    """Send ``send[r]`` leading rows of ``x`` (in rank order) to rank r; receive ``recv[r]`` from r."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, list(send), list(recv), group)
