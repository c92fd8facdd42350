"""Gate: softmax + top-k + per-expert counts in one pass over the logits.

Why: the PyTorch path runs softmax, top-k (or argmax twice), a gather, one-hot masks and a
column sum as separate launches, each reading the [T, E] gate matrix again. The kernel reads
each token's logits once and writes its K expert ids and weights, the per-expert route counts
and the per-expert sum of probabilities (for DeepSpeed's ``l_aux``).

Selection is on the logits, largest first, ties to the lowest expert id; a NaN logit counts as
-inf, so a row of NaNs still gets K distinct expert ids below E (a wrong id would give this rank
a counts vector of another length in the step's all-gather). Softmax is monotonic,
so this is DeepSpeed's choice (argmax / top-k over the softmax for k = 1 and k > 2, argmax over
the masked logits for the second of k = 2); it differs only where fp32 rounding makes two
different logits' probabilities equal. Choosing on the logits makes kernel and twin agree
exactly, whatever the rounding of ``exp``.

Legend: T tokens, E logical experts, K routes per token, B token blocks.
"""

from __future__ import annotations

from typing import Tuple

import torch

from . import HAS_TRITON
from ._launch import cdiv, check, next_pow2, tuned

__all__ = ["topk_gating", "topk_gating_torch"]

DEFAULTS = {"BLOCK_T": 32, "num_warps": 4}

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _topk_gating_kernel(
        logits_ptr,  # fp32/fp16/bf16 [T, E] gate logits, row-major
        expert_ptr,  # int64 [T, K] out: chosen experts, best first
        weight_ptr,  # fp32 [T, K] out: softmax probability of each chosen expert
        counts_ptr,  # int32 [E] in/out (zeroed): routes per expert, atomically accumulated
        gate_sum_ptr,  # fp32 [B, E] out: per-block sum over tokens of the softmax
        T, E,
        K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        row_ok = rows < T
        col_ok = cols < E
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        # Padded columns hold -inf: they get probability 0 and are never chosen over a real one.
        # NaN logits count as -inf too, so every row still gets K distinct ids below E.
        x = tl.where(col_ok[None, :] & (x == x), x, float("-inf"))
        row_max = tl.max(x, axis=1)
        num = tl.exp(x - row_max[:, None])
        denom = tl.sum(num, axis=1)
        prob = num / denom[:, None]
        tl.store(gate_sum_ptr + pid * E + cols, tl.sum(tl.where(ok, prob, 0.0), axis=0), mask=col_ok)
        counts = tl.zeros([BLOCK_E], dtype=tl.int32)
        taken = cols[None, :] >= E  # padded columns are never chosen
        for j in tl.static_range(K):
            best = tl.max(tl.where(taken, float("-inf"), x), axis=1)
            idx = tl.min(tl.where((x == best[:, None]) & (~taken), cols[None, :], BLOCK_E), axis=1)
            hit = cols[None, :] == idx[:, None]
            w = tl.sum(tl.where(hit, prob, 0.0), axis=1)
            tl.store(expert_ptr + rows.to(tl.int64) * K + j, idx.to(tl.int64), mask=row_ok)
            tl.store(weight_ptr + rows.to(tl.int64) * K + j, w, mask=row_ok)
            counts += tl.sum((hit & row_ok[:, None]).to(tl.int32), axis=0)
            taken = taken | hit
        tl.atomic_add(counts_ptr + cols, counts, mask=col_ok)


def shape_key(logits_TE: torch.Tensor, k: int) -> str:
    """The key of this launch's shape in ``tuned.json``."""
    return f"E={logits_TE.shape[1]},K={k}"


def topk_gating(logits_TE: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routes of every token, fused (Triton).

    Args:
        logits_TE: [T, E] gate logits (fp32, fp16 or bf16; math in fp32). T may be 0.
        k: routes per token, 1 <= k <= E.

    Returns:
        expert_TK int64 [T, K] (best first), weight_TK fp32 [T, K] (softmax probability),
        counts_E int64 [E] (routes per expert), gate_sum_E fp32 [E] (sum over tokens of the
        softmax; DeepSpeed's ``me`` is ``gate_sum_E / T``).
    """
    check("logits_TE", logits_TE, (torch.float32, torch.float16, torch.bfloat16), 2, logits_TE.device)
    T, E = logits_TE.shape
    if not 1 <= k <= E:
        raise ValueError(f"k must lie in [1, E={E}], got {k}")
    device = logits_TE.device
    expert_TK = torch.empty(T, k, dtype=torch.int64, device=device)
    weight_TK = torch.empty(T, k, dtype=torch.float32, device=device)
    counts_E = torch.zeros(E, dtype=torch.int32, device=device)
    if T == 0:
        return expert_TK, weight_TK, counts_E.long(), torch.zeros(E, dtype=torch.float32, device=device)
    cfg = tuned("topk_gating", device, shape_key(logits_TE, k), DEFAULTS)
    grid = (cdiv(T, cfg["BLOCK_T"]),)
    gate_sum_BE = torch.empty(grid[0], E, dtype=torch.float32, device=device)
    _topk_gating_kernel[grid](logits_TE.contiguous(), expert_TK, weight_TK, counts_E, gate_sum_BE, T, E,
                              K=k, BLOCK_T=cfg["BLOCK_T"], BLOCK_E=next_pow2(E), num_warps=cfg["num_warps"])
    return expert_TK, weight_TK, counts_E.long(), gate_sum_BE.sum(dim=0)


def topk_gating_torch(logits_TE: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch twin of ``topk_gating`` (same arguments and results)."""
    T, E = logits_TE.shape
    if not 1 <= k <= E:
        raise ValueError(f"k must lie in [1, E={E}], got {k}")
    logits_TE = logits_TE.float()
    # NOTE: NaN logits count as -inf (as in the kernel): every row gets K distinct ids below E.
    logits_TE = torch.where(torch.isnan(logits_TE), torch.full_like(logits_TE, float("-inf")), logits_TE)
    gates_TE = torch.softmax(logits_TE, dim=1)
    # NOTE: a stable descending sort keeps equal logits in id order: ties go to the lowest id,
    # as torch.argmax does (torch.topk leaves the order of ties unspecified).
    if k == 1:
        expert_TK = torch.argmax(logits_TE, dim=1, keepdim=True)
    else:
        expert_TK = torch.sort(logits_TE, dim=1, descending=True, stable=True).indices[:, :k]
    counts_E = torch.bincount(expert_TK.reshape(-1), minlength=E)
    return expert_TK, gates_TE.gather(1, expert_TK), counts_E, gates_TE.sum(dim=0)
