"""Combine (gather back, gate-weight in fp32, sum over k) against its PyTorch twin and a loop."""

import pytest
import torch

pytest.importorskip("triton")

from ds_moe_replicate.kernels.combine import combine_torch  # noqa: E402
from kernel_workers import float_dtypes, tolerance  # noqa: E402


def routes(T, k, N_drop, seed):
    """Send rows of a scrambled send order; ``N_drop`` routes not taken (pos = -1)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.full((T * k,), -1, dtype=torch.int64)
    taken = torch.randperm(T * k, generator=g)[N_drop:]
    pos[taken] = torch.randperm(taken.numel(), generator=g)
    return pos.view(T, k), taken.numel()


@pytest.mark.parametrize("dtype", float_dtypes())
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("T, H", [(1823, 781), (45, 13)])
def test_matches_twin_and_a_loop(T, H, k, dtype, device, launch):
    if T * k * H > 2_000_000:  # NOTE: keeps the interpreter quick; shapes stay irregular
        T = 611
    pos, N = routes(T, k, T // 5, seed=T + k)
    torch.manual_seed(k)
    y = torch.randn(N, H).to(dtype)
    weight = torch.rand(T, k)
    weight[pos < 0] = float("nan")  # an untaken route adds nothing, whatever its weight
    got = launch("combine", y.to(device), weight.to(device), pos.to(device)).cpu()
    assert got.dtype == dtype and got.shape == (T, H)
    tol = tolerance(dtype)
    torch.testing.assert_close(got, combine_torch(y, weight, pos), rtol=tol, atol=tol)
    ref = torch.zeros(T, H, dtype=torch.float64)
    for j in range(k):
        t = pos[:, j] >= 0
        ref[t] += weight[t, j, None].double() * y[pos[t, j]].double()
    torch.testing.assert_close(got.double(), ref.to(dtype).double(), rtol=tol, atol=tol)


def test_empty_and_nothing_taken(device, launch):
    w = torch.rand(0, 2, device=device)
    got = launch("combine", torch.zeros(0, 9, device=device), w, torch.zeros(0, 2, dtype=torch.int64, device=device))
    assert got.shape == (0, 9)
    pos = torch.full((3, 2), -1, dtype=torch.int64, device=device)
    got = launch("combine", torch.zeros(0, 9, device=device), torch.rand(3, 2, device=device), pos)
    assert got.shape == (3, 9) and not got.any()


def test_launcher_checks_inputs(device, launch):
    pos = torch.zeros(3, 2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="weight_TK: dtype"):
        launch("combine", torch.randn(6, 8, device=device), torch.rand(3, 2, dtype=torch.float64, device=device), pos)
    with pytest.raises(ValueError, match="expected y_NH"):
        launch("combine", torch.randn(6, 8, device=device), torch.rand(3, 3, device=device), pos)
