"""Micro-benchmark: each bookkeeping kernel against its PyTorch twin on the same inputs.

    python -m ds_moe_replicate.bench.kernels                 # Switch-base-128 sizes on a GPU, bf16
    python -m ds_moe_replicate.bench.kernels --smoke         # tiny sizes on CPU, twins only

Defaults are Switch-base-128's (d_model 768, 128 experts, top-1) with 16k tokens per rank, EP 8
and 2 replica slots per rank. The gate's logits are fp32 (the layer computes them in fp32); the
rows that are permuted and combined are in ``--dtype``. Every kernel's result is checked against
its twin before it is timed. Without CUDA only the twins run (a smoke check of the harness).

Legend: T tokens, H hidden, E experts, K routes per token, W ranks, S replica slots per rank.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from ..kernels import HAS_TRITON
from ..kernels import assign_slots as slots_mod
from ..kernels import combine as combine_mod
from ..kernels import permute as permute_mod
from ..kernels import topk_gating as gating_mod
from ..kernels._launch import interpreting
from ..planner import plan_replicas
from ..split import transport

__all__ = ["Inputs", "make_inputs", "time_ms", "cases", "run", "main"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Inputs:
    """One rank's inputs to the four kernels, built with the twins (so they are consistent)."""

    logits_TE: torch.Tensor
    k: int
    expert_TK: torch.Tensor
    send_P: torch.Tensor
    copies_ER: torch.Tensor
    x_TH: torch.Tensor
    order_N: torch.Tensor
    y_NH: torch.Tensor
    weight_TK: torch.Tensor
    pos_TK: torch.Tensor


def make_inputs(tokens: int, hidden: int, experts: int, k: int, ep_size: int, slots: int, dtype: torch.dtype,
                device: torch.device, seed: int = 0) -> Inputs:
    """Skewed routing (one hot expert), a replica plan for it, rank 0's split and rows."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, int(torch.randint(experts, (1,), generator=g))] += 2.0  # one hot expert
    expert_TK, weight_TK, counts_E, _ = gating_mod.topk_gating_torch(logits, k)
    counts_WE = np.stack([counts_E.numpy()] + [np.roll(counts_E.numpy(), r) for r in range(1, ep_size)])
    placement = plan_replicas(counts_WE.sum(axis=0).astype(float), ep_size, slots).placement()
    send_P = torch.from_numpy(transport(counts_WE, placement)[0].copy())
    copies_ER = torch.from_numpy(placement.log2phy_ER.copy())
    _, pos_L, order_N = slots_mod.assign_slots_torch(expert_TK, send_P, copies_ER)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    y = torch.randn(order_N.numel(), hidden, generator=g).to(dtype)
    to = dict(device=device)
    return Inputs(logits.to(**to), k, expert_TK.to(**to), send_P.to(**to), copies_ER.to(**to), x.to(**to),
                  order_N.to(**to), y.to(**to), weight_TK.to(**to), pos_L.view(tokens, k).to(**to))


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, wall clock on CPU).

    Not ``runtime.timed``: a kernel micro-benchmark times one launch on one device between two
    CUDA events (no barrier, no host synchronisation inside the sample), where ``timed`` times a
    whole step across ranks."""
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def cases(inp: Inputs) -> Dict[str, tuple]:
    """kernel name -> (module, args): the same arguments go to the kernel and to its twin."""
    return {
        "topk_gating": (gating_mod, (inp.logits_TE, inp.k)),
        "assign_slots": (slots_mod, (inp.expert_TK, inp.send_P, inp.copies_ER)),
        "permute": (permute_mod, (inp.x_TH, inp.order_N, inp.k)),
        "combine": (combine_mod, (inp.y_NH, inp.weight_TK, inp.pos_TK)),
    }


def max_diff(a, b) -> float:
    """Largest difference between two results relative to max(1, largest value) (tuples item by
    item; integer results must match exactly, else inf)."""
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    worst = 0.0
    for x, y in zip(a, b):
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return float("inf")
            continue
        if x.numel():
            scale = max(1.0, y.float().abs().max().item())
            worst = max(worst, (x.float() - y.float()).abs().max().item() / scale)
    return worst


def run(inp: Inputs, use_triton: bool, reps: int) -> List[dict]:
    rows = []
    device = inp.logits_TE.device
    for name, (module, args) in cases(inp).items():
        twin = getattr(module, name + "_torch")
        row = dict(kernel=name, torch_ms=time_ms(lambda: twin(*args), device, reps), triton_ms=None, max_diff=None)
        if use_triton:
            kernel = getattr(module, name)
            row["max_diff"] = max_diff(kernel(*args), twin(*args))
            row["triton_ms"] = time_ms(lambda: kernel(*args), device, reps)
        rows.append(row)
    return rows


def table(rows: List[dict], header: str) -> str:
    lines = [header, "", "| kernel | torch ms | triton ms | speed-up | max rel. diff vs twin |", "|---|---|---|---|---|"]
    for r in rows:
        t, d = r["triton_ms"], r["max_diff"]
        triton = "-" if t is None else f"{t:.3f}"
        speedup = "-" if t is None else f"{r['torch_ms'] / t:.2f}x"
        diff = "-" if d is None else f"{d:.1e}"
        lines.append(f"| {r['kernel']} | {r['torch_ms']:.3f} | {triton} | {speedup} | {diff} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--ep-size", type=int, default=8)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, twins only (checks the harness)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.tokens, args.hidden, args.experts, args.ep_size, args.reps = 301, 96, 16, 4, 3
    # NOTE: under TRITON_INTERPRET=1 the kernels run interpreted on CPU: a check of this harness's
    # Triton path (use --dtype fp32 or fp16 there), not a timing.
    use_triton = HAS_TRITON and (device.type == "cuda" or interpreting())
    inp = make_inputs(args.tokens, args.hidden, args.experts, args.k, args.ep_size, args.slots, DTYPES[args.dtype],
                      device)
    rows = run(inp, use_triton, args.reps)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             "CPU, Triton interpreted (timings meaningless)" if use_triton else "CPU (twins only: no GPU)")
    print(table(rows, f"{where}: T={args.tokens} H={args.hidden} E={args.experts} k={args.k} W={args.ep_size} "
                      f"S={args.slots}, rows {args.dtype}, logits fp32, median of {args.reps}"))
    bad = [r["kernel"] for r in rows if r["max_diff"] is not None and r["max_diff"] > 1e-2]
    if bad:
        raise SystemExit(f"kernels differ from their twins: {bad}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), device=where, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
