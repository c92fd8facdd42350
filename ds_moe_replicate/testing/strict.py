"""A strict wrapper around ``torch.distributed``'s tensor collectives, for tests: every call must
hand over tensors that live on the collective's device (``runtime.collective_device``: the rank's
CUDA device under NCCL, the CPU under gloo), and every call is counted by function name.

On a CPU-only machine the rule can only be checked for gloo; under NCCL (``launch/gpu_check.sh``)
the same test checks that no call site hands a CPU tensor to NCCL.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch
import torch.distributed as dist

from ..runtime import collective_device

__all__ = ["strict_collectives", "WRAPPED"]

WRAPPED = ("all_gather_into_tensor", "all_gather", "all_to_all_single", "all_reduce", "broadcast", "isend", "irecv",
           "send", "recv", "reduce_scatter_tensor")


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


@contextlib.contextmanager
def strict_collectives() -> Iterator[Counter]:
    """Inside the block, a collective handed a tensor on the wrong device raises AssertionError;
    yields a ``Counter`` of the calls made, by function name."""
    calls: Counter = Counter()
    originals = {name: getattr(dist, name) for name in WRAPPED if hasattr(dist, name)}

    def wrap(name, fn):
        def strict(*args, **kwargs):
            want = collective_device(kwargs.get("group"))
            for t in _tensors(list(args) + list(kwargs.values())):
                if t.device != want:
                    raise AssertionError(f"torch.distributed.{name} got a tensor on {t.device}; the collective's "
                                         f"device is {want}")
            calls[name] += 1
            return fn(*args, **kwargs)
        return strict

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
