"""The seed paper's scheme for comparison: tokens go to the experts a predictor chose, not the router.

``use_predicted_routing(model)`` wraps every router of a transformers MoE model so that every
sparse MLP of a stack (encoder, decoder) routes on the hidden states that *entered the stack*
(the token embeddings), normalised by the MLP's own pre-norm and scored by its own router,
instead of on its true, contextual input. Every layer's experts are thus known before the first
layer runs, so all of them can be prefetched in time: the prediction that predictive-prefetching
schemes make from the tokens alone. Experts then compute on the true hidden states with the
predicted experts and weights, which is where accuracy is lost.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..hf import find_moe_blocks

__all__ = ["PredictedRouter", "use_predicted_routing"]


class PredictedRouter(nn.Module):
    """Calls the HF ``router`` on ``norm(input of the stack's first transformer block)``."""

    def __init__(self, router: nn.Module, norm: nn.Module, seen: Dict[str, torch.Tensor], key: str) -> None:
        super().__init__()
        self.router = router
        self.norm = norm
        self.seen = seen
        self.key = key
        # The HF blocks read these from their router.
        for attr in ("num_experts", "top_k", "expert_capacity"):
            if hasattr(router, attr):
                setattr(self, attr, getattr(router, attr))

    def forward(self, hidden_states: torch.Tensor):
        early: Optional[torch.Tensor] = self.seen.get(self.key)
        if early is None or early.numel() != hidden_states.numel():
            return self.router(hidden_states)
        return self.router(self.norm(early).reshape(hidden_states.shape))


def _first_block(name: str) -> str:
    """Qualified name of the first transformer block of the stack holding ``name``: the first
    ``<list>.<index>`` of the name, with index 0."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i] + ["0"])
    raise ValueError(f"{name} is not inside a list of transformer blocks")


def use_predicted_routing(model: nn.Module) -> int:
    """Wrap the routers of ``model`` (in place); returns the number of sparse blocks wrapped."""
    seen: Dict[str, torch.Tensor] = {}
    blocks = find_moe_blocks(model)
    for name, sparse in blocks:
        parent = model.get_submodule(name.rpartition(".")[0])
        norm = getattr(parent, "layer_norm", None) or parent.post_attention_layernorm
        first = _first_block(name)
        if first not in seen:
            seen[first] = None

            def record(_module, args, kwargs, key=first):
                seen[key] = args[0] if args else kwargs["hidden_states"]

            model.get_submodule(first).register_forward_pre_hook(record, with_kwargs=True)
        attr = "router" if hasattr(sparse, "router") else "gate"
        setattr(sparse, attr, PredictedRouter(getattr(sparse, attr), norm, seen, first))
    return len(blocks)
