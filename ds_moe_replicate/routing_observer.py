"""Per-step routing of every MoE layer of a model, summed over the expert-parallel group.

Used by the training job and the evaluation harness to report balancedness and replicas per step
and to record traces, for stock, replicated and local MoE layers alike.

Legend: L MoE layers, E experts, W expert-parallel ranks.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist

from .planner import balancedness
from .runtime import all_reduce

__all__ = ["RoutingObserver"]


class RoutingObserver:
    """Per-step routing of every MoE layer of a model, summed over the expert-parallel group.

    Forward hooks keep each layer's returned ``exp_counts`` (this rank's routes; the same in the
    stock and the replicated forward), stats hooks keep ``StepStats`` when the layer produced one
    (replicated forwards). ``take()`` is collective over ``group``: one all-reduce of [L, E].
    """

    def __init__(self, layers: List[torch.nn.Module], group=None) -> None:
        self.layers, self.group = layers, group
        self._counts: Dict[int, torch.Tensor] = {}
        self._stats: Dict[int, object] = {}
        self._handles = []
        for j, layer in enumerate(layers):
            self._handles.append(layer.register_forward_hook(
                lambda _m, _i, out, j=j: self._counts.__setitem__(j, out[2].detach().reshape(-1).to(torch.int64))))
            if hasattr(layer, "register_stats_hook"):
                self._handles.append(layer.register_stats_hook(lambda s, j=j: self._stats.__setitem__(j, s)))

    def take(self, ep_size: int) -> Dict[str, object]:
        """Routing of the forward(s) since the last call.

        Returns:
            ``counts_LE`` (int64 numpy, group-wide), ``balancedness`` (mean over layers: the
            replicated layer's own figure where it reported one, else mean / max routes per rank
            under DeepSpeed's home placement) and ``replicas`` (replica slots in use, all layers).
        """
        if len(self._counts) != len(self.layers):
            raise RuntimeError(f"routing seen from {len(self._counts)} of {len(self.layers)} MoE layers this step")
        counts_LE = torch.stack([self._counts[j].cpu() for j in range(len(self.layers))])
        if dist.is_initialized() and ep_size > 1:
            counts_LE = all_reduce(counts_LE, group=self.group)
        bal, replicas = [], 0
        for j in range(len(self.layers)):
            stats = self._stats.get(j)
            if stats is not None:
                bal.append(stats.balancedness)
                replicas += stats.num_replicas
            else:
                bal.append(float(balancedness(counts_LE[j].reshape(ep_size, -1).sum(dim=1))))
        self._counts, self._stats = {}, {}
        return dict(counts_LE=counts_LE.numpy(), balancedness=float(np.mean(bal)), replicas=replicas)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
