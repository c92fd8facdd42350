"""Cross-layer lookahead: the order of a model's ReplicatedMoE layers, found on the first forward,
and the prediction of a layer's loads from an earlier point of the residual stream.

A node is a ``ReplicatedMOELayer`` or an ``EntryHook`` (a forward hook on the model's input
embeddings). The first time a node runs, the node that ran just before it (and had run once)
becomes its predecessor. From then on the predecessor applies the node's gate to its own input,
so the node's loads for *this* batch are known one layer ahead; the counts travel in the
predecessor's all-gather (no extra collective), and the node's replicas are prefetched while the
predecessor computes. Dense layers in between do not matter. Every rank runs the same modules in
the same order, so every rank links the same layers.

Legend: T tokens, H hidden, E logical experts.
"""

from __future__ import annotations

import weakref
from typing import List, Optional

import torch
from torch import nn

from .comm import gather_step, group_rank
from .gating import route

__all__ = ["link", "predict_counts", "active", "chain", "EntryHook", "attach_entry", "find_entry"]

_last: Optional[weakref.ReferenceType] = None


AHEAD = ("lookahead", "learned")


def _wants_lookahead(node) -> bool:
    layer = getattr(node, "moe_layer", node)
    return getattr(layer, "replication", None) is not None and layer.replication.predictor in AHEAD


def link(node) -> None:
    """Record that ``node`` runs now; on its first run, make the node that ran before it its
    predecessor (if that one ran exactly once and both want lookahead over the same group)."""
    global _last
    prev = _last() if _last is not None else None
    if (prev is not None and prev is not node and node.runs == 0 and prev.runs == 1 and prev.next_layer is None
            and hasattr(node, "controller") and _wants_lookahead(node) and _wants_lookahead(prev)
            and prev.hidden_size == node.hidden_size and prev.ep_group is node.ep_group):
        prev.set_next(node)
        node.mark_driven()
    _last = weakref.ref(node)


def predict_counts(layer, x_TH: torch.Tensor) -> torch.Tensor:
    """int64 [E] routes ``layer``'s gate would send to each expert for tokens ``x_TH``."""
    with torch.no_grad():
        expert_TK = route(layer.gate, x_TH, kernels=layer.replication.kernels).expert_TK
    return torch.bincount(expert_TK[expert_TK >= 0], minlength=layer.num_experts)


def active(layer, predictors=("lookahead",)) -> bool:
    """``layer`` will run its replicated path with one of ``predictors`` (the same answer on
    every rank)."""
    return (layer is not None and layer.replication.enabled and not layer.training
            and layer.replication.predictor in predictors)


def chain(first) -> List:
    """The linked layers from ``first`` on, in execution order."""
    out = []
    while first is not None and first not in out:
        out.append(first)
        first = first.next_layer
    return out


class EntryHook:
    """Forward hook on the input embeddings: predicts the first MoE layer's loads (lookahead),
    or every layer's (learned, with ``distiller``)."""

    def __init__(self, module: nn.Module, predictor_of, distiller=None) -> None:
        self.distiller = distiller
        self.runs = 0
        self.hidden_size = module.weight.shape[-1] if hasattr(module, "weight") else None
        self.ep_group = None
        self._next: Optional[weakref.ReferenceType] = None
        self._moe_of = predictor_of
        self.handle = module.register_forward_hook(self)

    @property
    def next_layer(self):
        return self._next() if self._next is not None else None

    def set_next(self, layer) -> None:
        self._next = weakref.ref(layer)

    @property
    def moe_layer(self):
        return self._moe_of()

    def __call__(self, module: nn.Module, inputs, output) -> None:
        h = output[0] if isinstance(output, tuple) else output
        nxt = self.next_layer
        if nxt is None:
            # Not linked yet: take the group and hidden size of the layers this hook serves.
            self.ep_group = getattr(self._moe_of(), "ep_group", None)
        link(self)
        self.runs += 1
        if not active(nxt, AHEAD):
            return
        learned = nxt.replication.predictor == "learned"
        layers = chain(nxt) if learned else [nxt]
        if learned and self.distiller is None:
            raise RuntimeError("moe_replication.predictor is 'learned' but no predictor was loaded: call "
                               "configure_replication(model, ds_config) after setting learned_path")
        if learned and (self.distiller.num_layers != len(layers)
                        or any(layer.num_experts != self.distiller.num_experts for layer in layers)):
            raise ValueError(f"moe_replication.learned_path: the predictor covers {self.distiller.num_layers} layers "
                             f"of {self.distiller.num_experts} experts, the model runs {len(layers)} MoE layers of "
                             f"{[layer.num_experts for layer in layers]}")
        error, x_TH = None, None
        counts = torch.zeros(sum(layer.num_experts for layer in layers), dtype=torch.int64, device=h.device)
        try:
            x_TH = h.detach().reshape(-1, nxt.hidden_size)
            if learned:
                counts = self.distiller.to(x_TH.device).predict_counts(x_TH).reshape(-1)
            else:
                counts = predict_counts(nxt, x_TH)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank by gather_step
            error = err
        empty = torch.zeros(0, dtype=torch.int64, device=h.device)
        g = gather_step(empty, 0 if x_TH is None else x_TH.shape[0], error, nxt.ep_group, lookahead_E=counts)
        predicted = g.lookahead_WE.sum(axis=0)
        start = 0
        for layer in layers:
            layer.controller.prefetch(predicted[start:start + layer.num_experts], layer.experts.deepspeed_experts,
                                      group_rank(layer.ep_group), layer.ep_group)
            start += layer.num_experts


_entries: "weakref.WeakKeyDictionary[nn.Module, EntryHook]" = weakref.WeakKeyDictionary()


def find_entry(model: nn.Module) -> Optional[nn.Module]:
    """The model's input embedding module: ``get_input_embeddings()`` if it has one, else its
    first ``nn.Embedding``."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        emb = getter()
        if isinstance(emb, nn.Module):
            return emb
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def attach_entry(model: nn.Module, first_layer_of, distiller=None) -> Optional[EntryHook]:
    """Put (once) an ``EntryHook`` on the model's input embeddings and give it ``distiller``;
    returns it (None if the model has no embedding module)."""
    entry = find_entry(model)
    if entry is None:
        return None
    if entry not in _entries:
        _entries[entry] = EntryHook(entry, first_layer_of)
    _entries[entry].distiller = distiller
    return _entries[entry]
