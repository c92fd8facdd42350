"""Measure a device's cost-model parameters: expert MLP throughput, memory and all-to-all bandwidth.

Used by the benchmark (CPU parameters for the cost model's check against the real run) and by
``launch/calibrate_costmodel.py`` (GPU parameters, bf16, Switch-base sizes). Every figure is
measured, none assumed: the expert MLP is timed on several row counts and fitted as
``t = launch + rows * 4*H*F / flops``; memory bandwidth from copying a large tensor; all-to-all
from ``all_to_all_single`` of two sizes (``t = latency + bytes / bandwidth``) when a process group
of more than one rank exists.

Legend: N rows, H hidden, F FFN.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ..runtime import all_reduce, median, timed
from .common import expert_mlp
from .costmodel import Hardware

__all__ = ["time_ms", "expert_throughput", "memory_bandwidth", "all_to_all_bandwidth", "measure_hardware"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median ms of ``fn()`` over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    return median([timed(fn)[1] for _ in range(repeats)])


def _fit_line(x: Sequence[float], y: Sequence[float]) -> Tuple[float, float]:
    """(intercept, slope) of a least-squares line, the intercept clipped at 0."""
    slope, icpt = np.polyfit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), 1)
    return max(float(icpt), 0.0), max(float(slope), 1e-30)


def expert_throughput(hidden: int, ffn: int, rows: Sequence[int], dtype: torch.dtype, device: torch.device,
                      repeats: int = 5) -> Dict:
    """Time the Switch FFN expert on each row count; returns ms per count, fitted FLOP/s and launch s."""
    torch.manual_seed(0)
    mlp = expert_mlp(hidden, ffn).to(device=device, dtype=dtype).eval()
    ms = []
    with torch.no_grad():
        for n in rows:
            x = torch.randn(n, hidden, device=device, dtype=dtype)
            ms.append(time_ms(lambda: mlp(x), device, repeats))
    launch_ms, ms_per_row = _fit_line(rows, ms)
    return dict(rows=list(rows), ms=ms, flops=4.0 * hidden * ffn / (ms_per_row * 1e-3), launch_s=launch_ms * 1e-3)


def memory_bandwidth(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Bytes/s of a device copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats)
    return 2.0 * nbytes / (ms * 1e-3)


def all_to_all_bandwidth(sizes: Sequence[int], device: torch.device, group=None, repeats: int = 5) -> Dict:
    """Fit ``latency + off-rank bytes / bandwidth`` to ``all_to_all_single`` of ``sizes`` bytes per rank.
    Every rank of ``group`` must call it."""
    W = dist.get_world_size(group)
    ms = []
    for nbytes in sizes:
        n = max(nbytes // 4 // W, 1) * W
        x = torch.ones(n, dtype=torch.float32, device=device)
        y = torch.empty_like(x)

        def run():
            dist.all_to_all_single(y, x, group=group)

        dist.barrier(group=group)
        t = all_reduce(torch.tensor([time_ms(run, device, repeats)], dtype=torch.float64), dist.ReduceOp.MAX, group)
        ms.append(float(t))
    off = [s * (W - 1) / W for s in sizes]
    latency_ms, ms_per_byte = _fit_line(off, ms)
    return dict(bytes=list(sizes), ms=ms, bandwidth=1.0 / (ms_per_byte * 1e-3), latency_s=latency_ms * 1e-3)


def measure_hardware(name: str, hidden: int, ffn: int, rows: Sequence[int], dtype: torch.dtype,
                     device: torch.device, a2a_sizes: Sequence[int] = (1 << 20, 8 << 20)) -> Tuple[Hardware, Dict]:
    """Measured ``Hardware`` (all-to-all measured only with a process group of 2+ ranks; else the
    memory bandwidth stands in for it) and the raw measurements."""
    mlp = expert_throughput(hidden, ffn, rows, dtype, device)
    mem = memory_bandwidth(64 << 20, device)
    raw = dict(expert=mlp, mem_bw=mem)
    if dist.is_initialized() and dist.get_world_size() > 1:
        a2a = all_to_all_bandwidth(a2a_sizes, device)
        raw["all_to_all"] = a2a
        bw, lat, per_node = a2a["bandwidth"], a2a["latency_s"], dist.get_world_size()
    else:
        bw, lat, per_node = mem, 0.0, 8
    elem = torch.tensor([], dtype=dtype).element_size()
    hw = Hardware(name, mlp["flops"], mem, bw, bw, per_node, lat, mlp["launch_s"], elem)
    return hw, raw
