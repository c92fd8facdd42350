"""Replica weights for a step with gradients (training): a differentiable copy of home experts.

``fetch_replicas`` is one autograd function per layer and step (FasterMoE's "shadow experts"
do the same). Its forward sends each replicated expert's current weights from the home rank to
the ranks that hold a copy this step; its backward sends the gradient each copy computed back
home, where it is added to the home parameters' gradient within the same backward. DeepSpeed's
gradient reduction, clipping and the optimizer then see ordinary gradients on the home
parameters only, and replicas hold no optimizer state. The weights travel with every step, so a
copy can never compute with weights older than its home's (docs/design.md, "Training").

Ordering (docs/design.md, "Never hang"): the function also returns a zero ``anchor`` that the
layer adds to its tokens before the dispatch all-to-all (to its output when its input needs no
gradient, so that no backward through the dispatch is added). Its backward therefore runs after
the dispatch all-to-all's backward (or the combine's) on every rank, so every rank issues the
gradient exchange at the same point of its backward, and every rank's backward calls it.

Legend: N flat parameters of one expert, Q copies this rank receives.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import List, Sequence

import torch
import torch.distributed as dist

from .comm import global_rank
from .placement import Transfer

__all__ = ["FetchSpec", "fetch_replicas", "wait_all"]


def wait_all(reqs: Sequence, timeout_s: float) -> None:
    """Wait for point-to-point requests, at most ``timeout_s`` each; a timeout raises."""
    limit = datetime.timedelta(seconds=timeout_s)
    for req in reqs:
        try:
            ok = req.wait(timeout=limit)
        except RuntimeError as err:
            raise TimeoutError(f"replica transfer did not finish within {timeout_s:.0f} s "
                               f"(moe_replication.timeout_s): {err}") from err
        if ok is False:
            raise TimeoutError(f"replica transfer did not finish within {timeout_s:.0f} s (moe_replication.timeout_s)")


@dataclass
class FetchSpec:
    """What one fetch moves. ``transfers`` is the same list on every rank (their order is the
    order in which both ends post their requests)."""

    transfers: List[Transfer]
    rank: int
    group: object
    experts_per_rank: int
    params_per_expert: int
    numel: int
    timeout_s: float
    tag: int = 0
    reqs: list = field(default_factory=list)
    keep: list = field(default_factory=list)
    waited_ms: float = 0.0

    @property
    def received(self) -> List[Transfer]:
        return [t for t in self.transfers if t.dst == self.rank]

    def wait(self) -> None:
        """Wait for this rank's weights to arrive (before the copies compute)."""
        t0 = time.perf_counter()
        wait_all(self.reqs, self.timeout_s)
        self.waited_ms += (time.perf_counter() - t0) * 1e3
        self.reqs, self.keep = [], []


class _Fetch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: FetchSpec, *params: torch.Tensor):
        ref = params[0]
        rows = spec.received
        buf_QN = ref.new_empty((len(rows), spec.numel))
        n = spec.params_per_expert
        row = 0
        for t in spec.transfers:
            if t.dst == spec.rank:
                spec.reqs.append(dist.irecv(buf_QN[row], src=global_rank(spec.group, t.src), group=spec.group,
                                            tag=spec.tag))
                row += 1
            elif t.src == spec.rank:
                j = t.expert - spec.rank * spec.experts_per_rank
                flat = torch.cat([p.reshape(-1) for p in params[j * n:(j + 1) * n]])
                spec.keep.append(flat)
                spec.reqs.append(dist.isend(flat, dst=global_rank(spec.group, t.dst), group=spec.group, tag=spec.tag))
        ctx.spec = ctx_spec = FetchSpec(spec.transfers, spec.rank, spec.group, spec.experts_per_rank, n, spec.numel,
                                        spec.timeout_s, spec.tag)
        ctx_spec.shapes = [p.shape for p in params]
        return buf_QN, ref.new_zeros(())

    @staticmethod
    def backward(ctx, grad_QN: torch.Tensor, _grad_anchor: torch.Tensor):
        spec = ctx.spec
        n = spec.params_per_expert
        shapes = spec.shapes
        reqs, keep, back = [], [], []
        row = 0
        for t in spec.transfers:
            if t.dst == spec.rank:
                g = grad_QN[row].contiguous()
                keep.append(g)
                reqs.append(dist.isend(g, dst=global_rank(spec.group, t.src), group=spec.group, tag=spec.tag))
                row += 1
            elif t.src == spec.rank:
                g = grad_QN.new_empty(spec.numel)
                back.append((t.expert - spec.rank * spec.experts_per_rank, g))
                reqs.append(dist.irecv(g, src=global_rank(spec.group, t.dst), group=spec.group, tag=spec.tag))
        wait_all(reqs, spec.timeout_s)
        grads: List = [None] * len(shapes)
        for j, g in back:
            sizes = [torch.Size(s).numel() for s in shapes[j * n:(j + 1) * n]]
            for i, part in enumerate(torch.split(g, sizes)):
                idx = j * n + i
                part = part.view(shapes[idx])
                grads[idx] = part if grads[idx] is None else grads[idx] + part
        return (None, *grads)


def fetch_replicas(spec: FetchSpec, home_params: Sequence[torch.Tensor]):
    """Start moving this step's replica weights; returns ``(buf_QN, anchor)``.

    ``buf_QN[q]`` holds the flat weights of this rank's q-th received copy (in ``spec.received``
    order) once ``spec.wait()`` returned; gradients flowing into it go home in the backward.
    ``anchor`` is a zero scalar to add to the tokens before the dispatch (see the module
    docstring). ``home_params``: this rank's home experts' parameters, expert by expert.
    """
    return _Fetch.apply(spec, *home_params)
