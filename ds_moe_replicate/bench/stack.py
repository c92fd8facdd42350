"""A stack of MoE layers for the benchmarks: input norm, then residual MoE layers.

``build_stack(kind, ...)`` gives the same weights for every kind (``"stock"``: DeepSpeed's
``MoE`` dropless; ``"stock_capacity"``: the same with capacity factor 1.0; ``"replicated"``:
``ReplicatedMoE``, replication off until configured). Expert weights differ per rank (each rank
holds its own experts) and are small, so a layer's output barely moves the residual stream and
routing is set by the workload's steered inputs (``workloads.steer_tokens``). The input norm is
exposed as ``get_input_embeddings()`` so the ``"lookahead"`` predictor can predict the first layer.

Legend: T tokens, H hidden, L MoE layers, E experts.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch import nn

from .common import expert_mlp

__all__ = ["MoEStack", "build_stack", "STACK_KINDS"]

STACK_KINDS = ("stock", "stock_capacity", "replicated")


class MoEStack(nn.Module):
    def __init__(self, hidden: int, layers: List[nn.Module]) -> None:
        super().__init__()
        self.entry = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList(layers)

    def get_input_embeddings(self) -> nn.Module:
        return self.entry

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        h = self.entry(x_TH)
        for layer in self.layers:
            h = h + layer(h)[0]
        return h

    def gate_dirs(self) -> torch.Tensor:
        """[L, E, H] unit gate rows of every layer (where steered tokens point)."""
        w = torch.stack([layer.deepspeed_moe.gate.wg.weight.detach().float().cpu() for layer in self.layers])
        return w / w.norm(dim=2, keepdim=True)


def build_stack(kind: str, hidden: int, ffn: int, num_experts: int, num_layers: int, ep_size: int, k: int = 1,
                seed: int = 0, expert_std: float = 0.01) -> MoEStack:
    """The stack of ``kind`` in eval mode with expert-parallel groups set (see the module docstring)."""
    from deepspeed.moe.layer import MoE

    from ..layer import ReplicatedMoE

    if kind not in STACK_KINDS:
        raise ValueError(f"stack kind must be one of {STACK_KINDS}, got {kind!r}")
    common = dict(num_experts=num_experts, ep_size=ep_size, k=k, use_rts=False, top2_2nd_expert_sampling=False)
    torch.manual_seed(seed)
    layers = []
    for _ in range(num_layers):
        expert = expert_mlp(hidden, ffn)
        if kind == "replicated":
            layers.append(ReplicatedMoE(hidden, expert, drop_tokens=False, **common))
        elif kind == "stock_capacity":
            layers.append(MoE(hidden, expert, drop_tokens=True, capacity_factor=1.0, eval_capacity_factor=1.0,
                              min_capacity=4, **common))
        else:
            layers.append(MoE(hidden, expert, drop_tokens=False, **common))
    stack = MoEStack(hidden, layers)
    rank = dist.get_rank() if dist.is_initialized() else 0
    with torch.no_grad():
        for j, layer in enumerate(stack.layers):
            g = torch.Generator().manual_seed(seed + 7 + j)
            wg = layer.deepspeed_moe.gate.wg.weight
            wg.copy_(torch.randn(wg.shape, generator=g))
            eg = torch.Generator().manual_seed(seed + 1000 * (rank + 1) + j)
            for p in layer.deepspeed_moe.experts.parameters():
                p.copy_(expert_std * torch.randn(p.shape, generator=eg))
        for layer in stack.layers:
            layer.set_deepspeed_parallelism()
    return stack.eval()
