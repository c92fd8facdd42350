"""Helpers of the kernel tests: where they run (GPU or interpreter), dtypes and tolerances, and
the bodies run in other processes: kernel launches in the interpreter's helper process, and the
per-rank body of the 2-rank layer test (importable by spawned ranks).
"""

import os
from dataclasses import dataclass
from typing import Tuple

import torch

__all__ = ["on_gpu", "float_dtypes", "tolerance", "ping", "launch", "triton_vs_torch", "KernelStep"]


@dataclass
class KernelStep:
    """One step of the layer with ``kernels="triton"`` beside ``kernels="torch"``."""

    diff: float                 # max |triton - torch| output (0 for a rank without tokens)
    scale: float                # max |torch| output
    shape_ok: bool              # both outputs have the input's shape
    l_aux_diff: float
    exp_counts_equal: bool      # DeepSpeed's exp_counts identical
    counts_equal: bool          # gathered routes per expert identical
    rank_tokens_equal: bool     # routes computed per rank identical
    versions: Tuple[int, int]   # plan version serving the step (triton, torch)
    replicas: int               # replicas serving the step (triton)
    dropped: int                # routes dropped over capacity (triton)


def on_gpu() -> bool:
    """Kernel tests launch compiled on CUDA when there is a device and no interpreter is asked for."""
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


def float_dtypes():
    """fp32 and fp16 everywhere; bf16 only compiled on a GPU (the interpreter's bf16 is wrong)."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if on_gpu() else [])


def tolerance(dtype: torch.dtype) -> float:
    """Float tolerance of kernel vs twin (the issue's: 1e-6 fp32, 1e-3 fp16)."""
    return {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]


def ping() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch(name: str, *args):
    """Call the Triton launcher ``ds_moe_replicate.kernels.<name>.<name>(*args)``."""
    import importlib

    module = importlib.import_module(f"ds_moe_replicate.kernels.{name}")
    return getattr(module, name)(*args)


def triton_vs_torch(rank, steps=5):
    """The layer with ``kernels="triton"`` and with ``"torch"``, same weights and batches.

    Plans change every step (replan_interval 1, two replica slots), one rank has no tokens at
    one step, and a capacity-mode run has untaken routes. Returns per case, a ``KernelStep`` per step.
    """
    import torch.distributed as dist

    from ds_moe_replicate.testing import build_pair, steer

    assert os.environ.get("TRITON_INTERPRET") == "1", "spawned ranks need TRITON_INTERPRET=1 before importing triton"
    W = dist.get_world_size()
    cases = [dict(k=1), dict(k=2), dict(k=4), dict(k=2, dropless=False)]
    results = []
    for case in cases:
        k = case["k"]
        layers = {}
        for kernels in ("triton", "torch"):
            rep_cfg = {"enabled": True, "slots_per_rank": 2, "replan_interval": 1, "kernels": kernels,
                       "dropless": case.get("dropless", True)}
            extra = {} if rep_cfg["dropless"] else dict(drop_tokens=True, eval_capacity_factor=1.0, min_capacity=1)
            layers[kernels] = build_pair(num_experts=8, ep_size=W, k=k, replication=rep_cfg, **extra)[1]
        gate_w = layers["torch"].deepspeed_moe.gate.wg.weight.detach()
        per_step = []
        for step in range(steps):
            n = 0 if (rank == 1 and step == 2) else 37 + 11 * rank + 5 * step
            x = steer(n, 16, gate_w, step % 8, 0.6, seed=rank * 17 + step) if n else torch.zeros(0, 16)
            with torch.no_grad():
                a, la, ca = layers["triton"](x)
                b, lb, cb = layers["torch"](x)
            sa, sb = layers["triton"].last_stats, layers["torch"].last_stats
            per_step.append(KernelStep(
                diff=(a - b).abs().max().item() if n else 0.0, scale=b.abs().max().item() if n else 0.0,
                shape_ok=a.shape == b.shape == x.shape,
                l_aux_diff=(la - lb).abs().item(), exp_counts_equal=bool(torch.equal(ca, cb)),
                counts_equal=bool(torch.equal(sa.counts_E, sb.counts_E)),
                rank_tokens_equal=bool(torch.equal(sa.rank_tokens_W, sb.rank_tokens_W)),
                versions=(sa.plan_version, sb.plan_version), replicas=sa.num_replicas, dropped=sa.dropped_tokens))
        results.append(per_step)
    return results
