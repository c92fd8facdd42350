"""Permute: gather token rows into send-buffer order.

Why: every taken route sends its token's row; ``index_select`` with ``order_N // K`` costs a
division launch and an index launch. The kernel reads each route's token index and copies its
row in tiles of ``BLOCK_H`` columns, in one launch (also used with k = 1 for the receiver's
regrouping of rows by local slot).

Legend: T rows in, H hidden, K routes per row, N rows out.
"""

from __future__ import annotations

import torch

from . import HAS_TRITON
from ._launch import FLOATS, cdiv, check, next_pow2, tuned

__all__ = ["permute", "permute_torch"]

DEFAULTS = {"BLOCK_N": 32, "BLOCK_H": 128, "num_warps": 4}

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _permute_kernel(
        x_ptr,  # fp32/fp16/bf16 [T, H] rows, row-major
        order_ptr,  # int64 [N] flat route index (token * K + j) of each output row
        out_ptr,  # same dtype as x, [N, H] out: row n is x[order[n] // K]
        N, H,
        K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        row_ok = rows < N
        ok = row_ok[:, None] & (cols[None, :] < H)
        src = tl.load(order_ptr + rows, mask=row_ok, other=0) // K
        v = tl.load(x_ptr + src[:, None] * H + cols[None, :], mask=ok)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * H + cols[None, :], v, mask=ok)


def shape_key(x_TH: torch.Tensor, order_N: torch.Tensor, k: int) -> str:
    """The key of this launch's shape in ``tuned.json``."""
    return f"H={x_TH.shape[1]},{str(x_TH.dtype).replace('torch.', '')}"


def permute(x_TH: torch.Tensor, order_N: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of ``x_TH`` in send order (Triton).

    Args:
        x_TH: [T, H] floating rows. order_N: int64 [N] flat route indices (token * k + j),
            each in [0, T * k). k: routes per token.

    Returns:
        [N, H] in ``x_TH``'s dtype: row n is ``x_TH[order_N[n] // k]``.
    """
    check("x_TH", x_TH, FLOATS, 2, x_TH.device)
    check("order_N", order_N, (torch.int64,), 1, x_TH.device)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    N, H = order_N.numel(), x_TH.shape[1]
    out_NH = torch.empty(N, H, dtype=x_TH.dtype, device=x_TH.device)
    if N == 0 or H == 0:
        return out_NH
    cfg = tuned("permute", x_TH.device, shape_key(x_TH, order_N, k), DEFAULTS)
    block_h = min(cfg["BLOCK_H"], next_pow2(H))
    grid = (cdiv(N, cfg["BLOCK_N"]), cdiv(H, block_h))
    _permute_kernel[grid](x_TH.contiguous(), order_N.contiguous(), out_NH, N, H, K=k, BLOCK_N=cfg["BLOCK_N"],
                          BLOCK_H=block_h, num_warps=cfg["num_warps"])
    return out_NH


def permute_torch(x_TH: torch.Tensor, order_N: torch.Tensor, k: int) -> torch.Tensor:
    """PyTorch twin of ``permute`` (same arguments and result)."""
    return x_TH.index_select(0, order_N if k == 1 else torch.div(order_N, k, rounding_mode="floor"))
