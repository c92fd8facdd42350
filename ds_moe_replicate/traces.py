"""Routing traces: per-layer, per-batch expert counts recorded from a model, saved, replayed.

File format (``save_trace`` / ``load_trace``; the extension picks it):

- ``.json``: ``{"format": "ds_moe_replicate.trace", "version": 1, "num_layers": L,
  "num_experts": E, "k": k, "source": "...", "counts": [[[int] * E] * L] * B}`` — ``counts[b][l][e]``
  is the number of routes (token, expert choice) of batch ``b`` that layer ``l`` sent to expert ``e``.
- ``.pt``: the same dict through ``torch.save``, with ``counts`` an int64 tensor [B, L, E].

Recording (``TraceRecorder``):

- ``recorder.attach(model)`` hooks every ``ReplicatedMoE`` (its ``StepStats.counts_E``: the whole
  expert-parallel group's counts), every stock ``deepspeed.moe.layer.MoE`` (its returned
  ``exp_counts``: this rank's), and every ``nn.Linear`` router of a transformers MoE model (a
  Linear named ``...gate`` or ``...router...`` whose ``out_features`` is the expert count: its
  output are the router logits, top-k taken here).
- ``recorder.add_router_logits(outputs.router_logits)`` takes the per-layer logits transformers
  returns with ``output_router_logits=True``, for models whose routers are not plain Linears.

A batch closes when a layer reports a second time (or on ``close_batch()`` / ``save()``).

Legend: B batches, L layers, E experts, T tokens, K routes per token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["Trace", "TraceRecorder", "counts_from_router_logits", "save_trace", "load_trace", "FORMAT"]

FORMAT = "ds_moe_replicate.trace"


@dataclass(frozen=True)
class Trace:
    counts_BLE: np.ndarray  # int64 [B, L, E]
    k: int = 1
    source: str = ""

    @property
    def num_batches(self) -> int:
        return self.counts_BLE.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counts_BLE.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts_BLE.shape[2]


def counts_from_router_logits(logits: torch.Tensor, k: int = 1, num_experts: Optional[int] = None) -> np.ndarray:
    """[E] routes per expert from router logits [..., E] with top-``k`` routing."""
    E = num_experts or logits.shape[-1]
    top = logits.detach().reshape(-1, logits.shape[-1]).float().topk(k, dim=-1).indices.reshape(-1)
    return torch.bincount(top.cpu(), minlength=E).numpy().astype(np.int64)


class TraceRecorder:
    """Collects per-layer counts batch by batch (see the module docstring)."""

    def __init__(self, k: int = 1, source: str = "") -> None:
        self.k, self.source = k, source
        self.batches: List[np.ndarray] = []
        self._current: Dict[int, np.ndarray] = {}
        self._handles: list = []
        self._num_layers: Optional[int] = None

    # ------------------------------------------------------------------ feeding
    def record(self, layer: int, counts_E) -> None:
        """Counts of layer ``layer`` for the batch in progress."""
        counts = np.asarray(counts_E.cpu() if isinstance(counts_E, torch.Tensor) else counts_E, dtype=np.int64)
        if layer in self._current:
            self.close_batch()
        self._current[layer] = counts.copy()

    def add_router_logits(self, router_logits: Sequence[torch.Tensor]) -> None:
        """One batch from transformers' ``outputs.router_logits`` (one [T, E] tensor per MoE layer)."""
        self.close_batch()
        logits = [t for t in router_logits if t is not None]
        if not logits:
            raise ValueError("router_logits is empty: run the model with output_router_logits=True")
        for j, t in enumerate(logits):
            self.record(j, counts_from_router_logits(t, self.k))
        self.close_batch()

    def close_batch(self) -> None:
        if not self._current:
            return
        L = max(self._current) + 1
        missing = sorted(set(range(L)) - set(self._current))
        if missing:
            raise ValueError(f"trace batch {len(self.batches)}: no counts from layers {missing}")
        self.batches.append(np.stack([self._current[j] for j in range(L)]))
        self._current = {}

    # ------------------------------------------------------------------ hooks
    def attach(self, model: nn.Module, num_experts: Optional[int] = None) -> int:
        """Hook every MoE layer or router of ``model`` (see the module docstring); returns how many.

        ``num_experts`` identifies transformers routers (Linear layers with that many outputs);
        it is read from ``model.config.num_experts`` / ``num_local_experts`` when not given.
        """
        from deepspeed.moe.layer import MoE

        from .layer import ReplicatedMoE

        if num_experts is None:
            cfg = getattr(model, "config", None)
            num_experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
        found = 0
        for name, module in model.named_modules():
            j = found
            if isinstance(module, ReplicatedMoE):
                def stats_hook(stats, j=j):
                    self.record(j, stats.counts_E)
                self._handles.append(module.register_stats_hook(stats_hook))
                # NOTE: in training mode (or replication off) no StepStats come: fall back to exp_counts.
                self._handles.append(module.register_forward_hook(
                    lambda m, i, o, j=j: None if m.replication.enabled and not m.training else self.record(j, o[2])))
            elif isinstance(module, MoE):
                self._handles.append(module.register_forward_hook(lambda m, i, o, j=j: self.record(j, o[2])))
            elif isinstance(module, nn.Linear) and num_experts and module.out_features == num_experts and \
                    ("router" in name or name.split(".")[-1] == "gate"):
                self._handles.append(module.register_forward_hook(
                    lambda m, i, o, j=j: self.record(j, counts_from_router_logits(o, self.k))))
            else:
                continue
            found += 1
        if not found:
            raise ValueError("attach: the model has no ReplicatedMoE, deepspeed MoE, or Linear router with "
                             f"num_experts={num_experts} outputs named '...gate' or '...router...'")
        return found

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def trace(self) -> Trace:
        self.close_batch()
        if not self.batches:
            raise ValueError("no batch was recorded")
        return Trace(np.stack(self.batches), self.k, self.source)

    def save(self, path: str) -> Trace:
        t = self.trace()
        save_trace(t, path)
        return t


def save_trace(trace: Trace, path: str) -> None:
    """Write ``trace`` as ``.json`` or ``.pt`` (by the extension of ``path``)."""
    body = dict(format=FORMAT, version=1, num_layers=trace.num_layers, num_experts=trace.num_experts, k=trace.k,
                source=trace.source)
    if path.endswith(".pt"):
        torch.save(dict(body, counts=torch.from_numpy(trace.counts_BLE.astype(np.int64))), path)
    elif path.endswith(".json"):
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(dict(body, counts=trace.counts_BLE.astype(np.int64).tolist()), fh)
    else:
        raise ValueError(f"trace path must end in .json or .pt, got {path!r}")


def load_trace(path: str) -> Trace:
    """Read a trace written by ``save_trace`` (checks the format tag and the shape)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--trace: no such file {path!r}")
    if path.endswith(".pt"):
        body = torch.load(path, weights_only=True)
        counts = np.asarray(body.get("counts").numpy() if isinstance(body.get("counts"), torch.Tensor)
                            else body.get("counts"))
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            body = json.load(fh)
        counts = np.asarray(body.get("counts"))
    else:
        raise ValueError(f"--trace: path must end in .json or .pt, got {path!r}")
    if body.get("format") != FORMAT:
        raise ValueError(f"--trace {path}: format tag {body.get('format')!r}, expected {FORMAT!r}")
    if counts.ndim != 3 or (counts < 0).any():
        raise ValueError(f"--trace {path}: counts must be non-negative [B, L, E], got shape {counts.shape}")
    return Trace(counts.astype(np.int64), int(body.get("k", 1)), str(body.get("source", "")))
