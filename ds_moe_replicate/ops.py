"""Which implementation of each bookkeeping kernel runs: Triton or its PyTorch twin.

``moe_replication.kernels`` decides, per call, from the tensors' device:

- ``"auto"``: the Triton kernel on CUDA tensors when ``triton`` imports and the compiled kernel
  tests have passed on this kind of device (``kernels/verified.json``, written by
  ``launch/gpu_check.sh``; none so far), the twin otherwise;
- ``"triton"``: always the kernel; refused with a clear error when ``triton`` is missing, or on
  a CPU tensor without ``TRITON_INTERPRET=1`` (Triton runs on CPU only in its interpreter);
- ``"torch"``: always the twin.

The twins (``ds_moe_replicate.kernels.*_torch``) are the one PyTorch implementation of each
computation: ``gating`` and ``dispatch`` call through here and keep no copy of their own.
"""

from __future__ import annotations

from typing import Callable

import torch

from .kernels import HAS_TRITON
from .kernels import assign_slots as _slots
from .kernels import combine as _combine
from .kernels import permute as _permute
from .kernels import topk_gating as _gating
from .kernels._launch import interpreting, verified

__all__ = ["KernelUnavailable", "use_triton", "topk_gating", "assign_slots", "permute", "combine", "CHOICES"]

CHOICES = ("auto", "triton", "torch")


class KernelUnavailable(RuntimeError):
    """``moe_replication.kernels = "triton"`` was asked for where Triton cannot run."""


def use_triton(kernels: str, device: torch.device) -> bool:
    """Whether ``kernels`` (the config value) runs the Triton kernel for tensors on ``device``."""
    if kernels == "torch":
        return False
    if kernels == "auto":
        return HAS_TRITON and device.type == "cuda" and verified(device)
    if kernels == "triton":
        if not HAS_TRITON:
            raise KernelUnavailable("moe_replication.kernels is 'triton' but triton is not installed "
                                    "(pip install 'ds-moe-replicate[kernels]'), or set it to 'auto' or 'torch'")
        if device.type == "cpu" and not interpreting():
            raise KernelUnavailable("moe_replication.kernels is 'triton' but the tensors are on the CPU: Triton runs "
                                    "there only in its interpreter (TRITON_INTERPRET=1 set before triton is imported; "
                                    "for tests); set it to 'auto' or 'torch'")
        return True
    raise ValueError(f"moe_replication.kernels must be one of {list(CHOICES)}, got {kernels!r}")


def _pick(module, name: str, kernels: str, device: torch.device) -> Callable:
    return getattr(module, name if use_triton(kernels, device) else name + "_torch")


def topk_gating(logits_TE: torch.Tensor, k: int, *, kernels: str = "torch"):
    """``kernels.topk_gating`` or its twin: (expert_TK, weight_TK, counts_E, gate_sum_E)."""
    return _pick(_gating, "topk_gating", kernels, logits_TE.device)(logits_TE, k)


def assign_slots(expert_TK: torch.Tensor, send_P: torch.Tensor, copies_ER: torch.Tensor, *, kernels: str = "torch"):
    """``kernels.assign_slots`` or its twin: (slot_L, pos_L, order_N)."""
    return _pick(_slots, "assign_slots", kernels, expert_TK.device)(expert_TK, send_P, copies_ER)


def permute(x_TH: torch.Tensor, order_N: torch.Tensor, k: int, *, kernels: str = "torch") -> torch.Tensor:
    """``kernels.permute`` or its twin: ``x_TH[order_N // k]``."""
    return _pick(_permute, "permute", kernels, x_TH.device)(x_TH, order_N, k)


def combine(y_NH: torch.Tensor, weight_TK: torch.Tensor, pos_TK: torch.Tensor, *, kernels: str = "torch"):
    """``kernels.combine`` or its twin: [T, H] gate-weighted sum over k, fp32 accumulation."""
    return _pick(_combine, "combine", kernels, y_NH.device)(y_NH, weight_TK, pos_TK)
