"""Permute (gather rows into send order) against its PyTorch twin and plain indexing."""

import pytest
import torch

pytest.importorskip("triton")

from ds_moe_replicate.kernels.permute import permute_torch  # noqa: E402
from kernel_workers import float_dtypes  # noqa: E402


@pytest.mark.parametrize("dtype", float_dtypes())
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("T, H", [(1823, 781), (45, 13)])
def test_matches_twin(T, H, k, dtype, device, launch):
    torch.manual_seed(T + k)
    if T * k * H > 2_000_000:  # NOTE: keeps the interpreter quick; shapes stay irregular
        T = 611
    x = torch.randn(T, H).to(dtype)
    # A subset of the routes in a scrambled order, as the send order is.
    order = torch.randperm(T * k)[: T * k - T // 3]
    got = launch("permute", x.to(device), order.to(device), k).cpu()
    assert got.dtype == dtype and got.shape == (order.numel(), H)
    assert torch.equal(got, permute_torch(x, order, k))  # a copy: bit for bit
    assert torch.equal(got, x[order // k])


def test_empty(device, launch):
    x = torch.randn(7, 33, device=device)
    got = launch("permute", x, torch.zeros(0, dtype=torch.int64, device=device), 2)
    assert got.shape == (0, 33)
    assert launch("permute", torch.zeros(0, 33, device=device), torch.zeros(0, dtype=torch.int64, device=device),
                  1).shape == (0, 33)


def test_launcher_checks_inputs(device, launch):
    with pytest.raises(ValueError, match="order_N: dtype"):
        launch("permute", torch.randn(4, 8, device=device), torch.zeros(2, dtype=torch.int32, device=device), 1)
    with pytest.raises(ValueError, match="x_TH: dtype"):
        launch("permute", torch.zeros(4, 8, dtype=torch.int64, device=device),
               torch.zeros(2, dtype=torch.int64, device=device), 1)
