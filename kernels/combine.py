"""Combine: expert outputs back to token order, weighted by the gate in fp32, summed over k.

Why: the PyTorch path scatters the received rows into a zeroed [T * K, H] buffer, multiplies by
the weights (an fp32 copy of the whole buffer) and sums over k: three full passes and two
[T, K, H] temporaries. The kernel gathers, for each token, its K rows by their send positions,
accumulates ``weight * row`` in fp32 registers and writes [T, H] once. Gathering (not
scattering) needs no atomics, so the result is deterministic.

Legend: T tokens, K routes per token, H hidden, N rows (routes that were sent).
"""

from __future__ import annotations

import torch

from . import HAS_TRITON
from ._launch import FLOATS, cdiv, check, next_pow2, tuned

__all__ = ["combine", "combine_torch"]

DEFAULTS = {"BLOCK_T": 16, "BLOCK_H": 128, "num_warps": 4}

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _combine_kernel(
        y_ptr,  # fp32/fp16/bf16 [N, H] expert output of each sent route, in send order
        weight_ptr,  # fp32 [T, K] combine weight of each route
        pos_ptr,  # int64 [T, K] send row of each route, -1 = not taken (contributes 0)
        out_ptr,  # same dtype as y, [T, H] out
        T, H,
        K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        row_ok = rows < T
        col_ok = cols < H
        acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
        for j in tl.static_range(K):
            pos = tl.load(pos_ptr + rows * K + j, mask=row_ok, other=-1)
            w = tl.where(pos >= 0, tl.load(weight_ptr + rows * K + j, mask=row_ok, other=0.0), 0.0)
            ok = (pos >= 0)[:, None] & col_ok[None, :]
            y = tl.load(y_ptr + tl.maximum(pos, 0)[:, None] * H + cols[None, :], mask=ok, other=0.0)
            acc += y.to(tl.float32) * w[:, None]
        out_ok = row_ok[:, None] & col_ok[None, :]
        tl.store(out_ptr + rows[:, None].to(tl.int64) * H + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=out_ok)


def _check_sizes(y_NH: torch.Tensor, weight_TK: torch.Tensor, pos_TK: torch.Tensor) -> None:
    if y_NH.dim() != 2 or weight_TK.dim() != 2 or pos_TK.shape != weight_TK.shape:
        raise ValueError(f"expected y_NH [N, H], weight_TK and pos_TK [T, K]; got shapes {tuple(y_NH.shape)}, "
                         f"{tuple(weight_TK.shape)}, {tuple(pos_TK.shape)}")


def shape_key(y_NH: torch.Tensor, weight_TK: torch.Tensor, pos_TK: torch.Tensor) -> str:
    """The key of this launch's shape in ``tuned.json``."""
    return f"H={y_NH.shape[1]},K={pos_TK.shape[1]},{str(y_NH.dtype).replace('torch.', '')}"


def combine(y_NH: torch.Tensor, weight_TK: torch.Tensor, pos_TK: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum over k of each token's expert outputs (Triton).

    Args:
        y_NH: [N, H] expert outputs in send order (fp32, fp16 or bf16).
        weight_TK: fp32 [T, K] combine weights (any value where a route was not taken: it adds 0).
        pos_TK: int64 [T, K] send row of each route (-1 = not taken), ``assign_slots``' ``pos``.

    Returns:
        [T, H] in ``y_NH``'s dtype, accumulated in fp32.
    """
    _check_sizes(y_NH, weight_TK, pos_TK)
    device = y_NH.device
    check("y_NH", y_NH, FLOATS, 2, device)
    check("weight_TK", weight_TK, (torch.float32,), 2, device)
    check("pos_TK", pos_TK, (torch.int64,), 2, device)
    (T, K), H = pos_TK.shape, y_NH.shape[1]
    out_TH = torch.empty(T, H, dtype=y_NH.dtype, device=device)
    if T == 0 or H == 0:
        return out_TH
    if K == 0:
        return out_TH.zero_()
    cfg = tuned("combine", device, shape_key(y_NH, weight_TK, pos_TK), DEFAULTS)
    block_h = min(cfg["BLOCK_H"], next_pow2(H))
    grid = (cdiv(T, cfg["BLOCK_T"]), cdiv(H, block_h))
    _combine_kernel[grid](y_NH.contiguous(), weight_TK.contiguous(), pos_TK.contiguous(), out_TH, T, H, K=K,
                          BLOCK_T=cfg["BLOCK_T"], BLOCK_H=block_h, num_warps=cfg["num_warps"])
    return out_TH


def combine_torch(y_NH: torch.Tensor, weight_TK: torch.Tensor, pos_TK: torch.Tensor) -> torch.Tensor:
    """PyTorch twin of ``combine`` (same arguments and result)."""
    _check_sizes(y_NH, weight_TK, pos_TK)
    (T, K), H = pos_TK.shape, y_NH.shape[1]
    taken = pos_TK >= 0
    routed = y_NH.new_zeros(T, K, H)
    routed[taken] = y_NH[pos_TK[taken]]
    weight_TK = torch.where(taken, weight_TK, torch.zeros_like(weight_TK))
    return (routed * weight_TK.unsqueeze(-1)).sum(dim=1).to(y_NH.dtype)
