"""One expert of a grouped-weight expert module, and the weights of every slot on this rank.

DeepSpeed AutoEP keeps a rank's experts as grouped tensors (``GroupedExperts.w1 [E_loc, F, H]``,
``w2 [E_loc, H, F]``, ``w3 [E_loc, F, H]``): expert j is the slices ``w[j]``. ``ExpertSlice``
presents those slices the way the replica store and the fetch read a home expert (named
parameters, no buffers), so both move a grouped expert exactly as they move an ``nn.Module`` one.
``replica_weights`` presents the replica slots' copies as grouped tensors (views, no copy), so that
AutoEP's own expert step runs on replica rows as it runs on home rows.

Legend: E_loc home experts per rank, S replica slots per rank, C = E_loc + S, F expert FFN size,
H hidden, Q copies this rank received, N flat parameters of one expert.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn

from .replicas import ExpertLayout

__all__ = ["GROUPED_NAMES", "ExpertSlice", "expert_slices", "replica_weights"]

# Parameter names of deepspeed.moe.ep_experts.GroupedExperts, in the order a flat copy holds them.
GROUPED_NAMES = ("w1", "w2", "w3")


class ExpertSlice:
    """Expert ``j`` of a grouped expert module: its parameters are the slices ``w[j]``.

    Slices are views, so a copy made from them holds the current weights, and gradients that
    autograd sends into them land in the grouped tensors' gradients.
    """

    def __init__(self, experts: nn.Module, j: int) -> None:
        self.experts, self.j = experts, j

    def named_parameters(self) -> List[Tuple[str, torch.Tensor]]:
        return [(n, getattr(self.experts, n)[self.j]) for n in GROUPED_NAMES]

    def parameters(self) -> List[torch.Tensor]:
        return [p for _, p in self.named_parameters()]

    def buffers(self) -> Iterator[torch.Tensor]:
        return iter(())


def expert_slices(experts: nn.Module) -> List[ExpertSlice]:
    """Every home expert of a grouped expert module, in local order."""
    return [ExpertSlice(experts, j) for j in range(experts.w1.shape[0])]


def replica_weights(layout: ExpertLayout, rows_QN: torch.Tensor, slot_of_row: Sequence[int],
                    num_slots: int, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Grouped weights of this rank's S replica slots, for ``torch.func.functional_call`` on
    the rank's ``GroupedExperts`` (its home weights are not copied: home rows run on them).

    Args:
        layout: how one expert's parameters lie in a flat row (``GROUPED_NAMES`` order).
        rows_QN: [Q, N] flat copies (the store's slot buffers, or the rows fetched with the step).
        slot_of_row: replica slot of each row of ``rows_QN``.
        num_slots: S; slots holding no row get zero weights (they compute no rows).
        dtype: the home weights' dtype.

    Returns:
        ``{name: [S, ...]}``: views of ``rows_QN`` when it holds every slot in order, else a copy;
        differentiable in ``rows_QN``.
    """
    if list(slot_of_row) == list(range(num_slots)):
        full_SN = rows_QN
    else:
        full_SN = rows_QN.new_zeros((num_slots, layout.numel))
        if len(slot_of_row):
            index = torch.tensor(list(slot_of_row), dtype=torch.int64, device=rows_QN.device)
            full_SN = full_SN.index_copy(0, index, rows_QN)
    out, start = {}, 0
    for name, shape, numel in zip(layout.names, layout.shapes, layout.numels):
        out[name] = full_SN[:, start:start + numel].unflatten(1, tuple(shape)).to(dtype)
        start += numel
    return out
