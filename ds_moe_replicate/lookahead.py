"""Cross-layer prediction: the order of one model's replicated MoE layers, found on its first
forward, and the prediction of a layer's loads from an earlier point of the residual stream.

A ``Chain`` belongs to one model (``configure_replication`` makes it); its nodes are the model's
``ReplicatedMOELayer``s and, optionally, an ``EntryHook`` (a forward hook on the model's input
embeddings). The first time a node runs, the node that ran just before it in the same chain
becomes its predecessor. From then on the predecessor predicts the node's loads for *this*
batch before the node runs: with ``"lookahead"`` by applying the node's gate to its own input,
with ``"learned"`` from the distilled predictor's output at the embeddings. The counts travel in
the predecessor's all-gather (no extra collective), and the node's copies are prefetched while
the predecessor computes. Every rank runs the same modules in the same order, so every rank
links the same layers; the links are part of each step's fingerprint.

What a node needs (``AheadNode``) is declared below; the layer implements it.

Legend: T tokens, H hidden, L MoE layers, E logical experts.
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional, Protocol

import numpy as np
import torch
from torch import nn

from .comm import SITE_ENTRY, Fingerprint, gather_step
from .gating import count_routes, route

__all__ = ["AheadNode", "Chain", "EntryHook", "attach_entry", "find_entry", "predict_counts"]


class AheadNode(Protocol):
    """What the chain reads of a node (a layer, or the entry hook)."""

    runs: int                   # forwards so far
    ep_group: object
    num_experts: int

    @property
    def wants_ahead(self) -> bool:
        """Runs its replicated path with an AHEAD predictor now (the same on every rank)."""

    def offer_ahead(self, predicted_E: np.ndarray, version_W: np.ndarray, grad: bool) -> None:
        """Take this batch's predicted loads (and prefetch for them; ``version_W``: the node's
        home weights versions, gathered)."""


def predict_counts(layer, x_TH: torch.Tensor):
    """int64 [E] routes ``layer``'s gate would send to each expert for tokens ``x_TH`` (as
    ``gating.count_routes`` returns them: NumPy on the host, a tensor on a device)."""
    with torch.no_grad():
        expert_TK = route(layer.gate, x_TH, kernels=layer.replication.kernels).expert_TK
    return count_routes(expert_TK, layer.num_experts)


class Chain:
    """The lookahead links of one model's nodes."""

    def __init__(self, distiller=None) -> None:
        self.distiller = distiller
        self._last: Optional[weakref.ReferenceType] = None
        self._next: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._index: Dict[int, int] = {}   # id(layer) -> position among the chain's layers
        self.learned_LE: Optional[torch.Tensor] = None  # this batch's learned counts, local

    def link(self, node) -> None:
        """Record that ``node`` runs now; on its first run, link it after the node that ran
        just before it (if that one ran exactly once and both predict ahead over one group)."""
        prev = self._last() if self._last is not None else None
        if (prev is not None and prev is not node and node.runs == 0 and prev.runs == 1
                and self.next_of(prev) is None and isinstance(node, nn.Module)
                and (isinstance(prev, EntryHook)
                     or (prev.ep_group is node.ep_group and prev.num_experts == node.num_experts))):
            self._next[prev] = weakref.ref(node)
            node.policy.driven = True
        if isinstance(node, nn.Module) and id(node) not in self._index:
            self._index[id(node)] = len(self._index)
        self._last = weakref.ref(node)

    def next_of(self, node):
        ref = self._next.get(node)
        return ref() if ref is not None else None

    def is_driven(self, node) -> bool:
        return any(ref() is node for ref in self._next.values())

    def ahead_counts(self, node, x_TH: torch.Tensor):
        """Local predicted counts of the node ``node`` predicts, or None if it predicts none now."""
        nxt = self.next_of(node)
        if nxt is None or not nxt.wants_ahead:
            return None
        if nxt.policy.predictor.needs_file:
            if self.learned_LE is None:
                return None
            return self.learned_LE[self._index[id(nxt)]]
        return predict_counts(nxt, x_TH)


class EntryHook:
    """Forward hook on the input embeddings: predicts the first layer's loads (and, with the
    learned predictor, every layer's, kept in the chain for the layers to pass on)."""

    ep_group = None
    num_experts = 0

    def __init__(self, module: nn.Module, chain: Chain) -> None:
        self.chain = chain
        self.runs = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, inputs, output) -> None:
        h = output[0] if isinstance(output, tuple) else output
        chain = self.chain
        chain.link(self)
        self.runs += 1
        nxt = chain.next_of(self)
        if nxt is None or not nxt.wants_ahead:
            return
        error, x_TH, ahead = None, None, None
        try:
            x_TH = h.detach().reshape(-1, nxt.hidden_size)
            if nxt.policy.predictor.needs_file:
                chain.learned_LE = self._learned(x_TH)
            ahead = chain.ahead_counts(self, x_TH)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank by gather_step
            error = err
        zeros = torch.zeros(nxt.num_experts, dtype=torch.int64, device=h.device)
        g = gather_step(zeros, Fingerprint(SITE_ENTRY, config=nxt.config_hash), nxt.ep_group,
                        tokens=0 if x_TH is None else x_TH.shape[0], error=error, where="replication policy",
                        ahead_E=ahead, ahead_version=nxt.weights_version())
        nxt.offer_ahead(g.ahead_total_E, g.ahead_version_W, nxt.grad_step())

    def _learned(self, x_TH: torch.Tensor) -> torch.Tensor:
        distiller = self.chain.distiller
        if distiller is None:
            raise RuntimeError("moe_replication.predictor is 'learned' but no predictor was loaded: call "
                               "configure_replication(model, ds_config) after setting learned_path")
        layers = len(self.chain._index)
        if distiller.num_layers != layers:
            raise ValueError(f"moe_replication.learned_path: the predictor covers {distiller.num_layers} layers, "
                             f"the model runs {layers} replicated MoE layers")
        return distiller.to(x_TH.device).predict_counts(x_TH)


def find_entry(model: nn.Module) -> Optional[nn.Module]:
    """The model's input embedding module: ``get_input_embeddings()`` if it has one, else its
    first ``nn.Embedding``."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        emb = getter()
        if isinstance(emb, nn.Module):
            return emb
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def attach_entry(model: nn.Module, chain: Chain) -> Optional[EntryHook]:
    """Put an ``EntryHook`` for ``chain`` on the model's input embeddings (replacing one a
    previous configuration left); returns it (None if the model has no embedding module)."""
    entry = find_entry(model)
    if entry is None:
        return None
    old = getattr(entry, "_ds_moe_entry", None)
    if old is not None:
        old.handle.remove()
    hook = EntryHook(entry, chain)
    entry._ds_moe_entry = hook
    return hook
