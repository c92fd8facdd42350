"""Process set-up for jobs under the ``deepspeed`` launcher, and the one step timer.

Used by the main job, the training job, the evaluation harness and the benchmarks alike.
"""

from __future__ import annotations

import atexit
import os
import statistics
import time
from typing import Any, Callable, List, Tuple

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "device_for_rank", "collective_device", "all_reduce", "timed", "all_max", "median"]


def init_distributed() -> None:
    """Initialise ``deepspeed.comm`` as the ``deepspeed`` launcher expects: NCCL on GPUs, gloo on CPU.

    On CPU, DeepSpeed's shared-memory all-reduce op is not loaded: these jobs exchange through
    all-gather and all-to-all, and the op leaves a 69 MB file per rank and port in /dev/shm.
    """
    import deepspeed
    import deepspeed.ops

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "gloo":
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        atexit.register(_finish_distributed)
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def _finish_distributed() -> None:
    # NOTE: tearing the process group down explicitly, after any replica transfer still in
    # flight, avoids an abort ("terminate called without an active exception") when the
    # interpreter destroys gloo's threads on its own at exit.
    from .replicas import finish_in_flight

    finish_in_flight()
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for_rank() -> torch.device:
    """This rank's device: its local CUDA device, else the CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def collective_device(group=None) -> torch.device:
    """Where tensors handed to a collective of ``group`` must live: this rank's CUDA device under
    NCCL (which takes device tensors only), the CPU under gloo (docs/design.md, "GPU-correct")."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """All-reduce ``t`` on the collective's device; returns the result on ``t``'s device."""
    if not dist.is_initialized():
        return t
    work = t.to(collective_device(group))
    dist.all_reduce(work, op=op if op is not None else dist.ReduceOp.SUM, group=group)
    return work.to(t.device)


def timed(fn: Callable[[], Any], group=None) -> Tuple[Any, float]:
    """Run ``fn()`` after a barrier; returns (result, ms), the ms being the slowest rank's."""
    if dist.is_initialized():
        dist.barrier(group=group)
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    return out, all_max(ms, group)


def all_max(value: float, group=None) -> float:
    """The largest ``value`` over the ranks (a device tensor, as NCCL needs)."""
    if not dist.is_initialized():
        return value
    return float(all_reduce(torch.tensor([value], dtype=torch.float64), dist.ReduceOp.MAX, group))


def median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")
