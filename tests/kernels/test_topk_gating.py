"""Fused softmax + top-k + counts against its PyTorch twin (and against plain top-k)."""

import pytest
import torch

pytest.importorskip("triton")

from ds_moe_replicate.kernels.topk_gating import topk_gating_torch  # noqa: E402
from kernel_workers import float_dtypes, tolerance  # noqa: E402


def assert_same(launch, logits, k, dtype):
    got = launch("topk_gating", logits, k)
    ref = topk_gating_torch(logits, k)
    tol = tolerance(dtype)
    assert torch.equal(got[0], ref[0])  # expert ids: exact
    assert torch.equal(got[2], ref[2])  # counts: exact
    assert got[0].dtype == got[2].dtype == torch.int64 and got[1].dtype == got[3].dtype == torch.float32
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=tol)
    torch.testing.assert_close(got[3], ref[3], rtol=tol, atol=tol)
    return got


@pytest.mark.parametrize("dtype", float_dtypes())
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("T, E", [(1823, 61), (37, 5)])
def test_matches_twin_and_plain_topk(T, E, k, dtype, device, launch):
    torch.manual_seed(T + E + k)
    logits = (torch.randn(T, E) * 3).to(dtype).to(device)
    expert, weight, counts, gate_sum = assert_same(launch, logits, k, dtype)
    # Independent of the twin: the k largest probabilities, best first, and their counts.
    probs = torch.softmax(logits.float(), dim=1)
    top = probs.topk(k, dim=1)
    torch.testing.assert_close(weight, top.values, rtol=0, atol=tolerance(dtype))
    assert torch.equal(probs.gather(1, expert), probs.gather(1, top.indices))
    assert torch.equal(counts.cpu(), torch.bincount(expert.reshape(-1).cpu(), minlength=E))
    assert int(counts.sum()) == T * k
    assert all(len(set(r)) == k for r in expert.tolist())  # k different experts per token
    torch.testing.assert_close(gate_sum.sum(), torch.tensor(float(T), device=device), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_ties_go_to_the_lowest_expert_id(k, device, launch):
    torch.manual_seed(k)
    logits = torch.randint(-2, 2, (203, 11)).float().to(device)  # many exact ties
    expert = assert_same(launch, logits, k, torch.float32)[0]
    row = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 3.0, -1.0]], device=device)
    assert launch("topk_gating", row, k)[0].tolist() == [[1, 2, 4, 5][:k]]
    assert expert.shape == (203, k)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_empty_batch(k, device, launch):
    expert, weight, counts, gate_sum = assert_same(launch, torch.zeros(0, 9, device=device), k, torch.float32)
    assert expert.shape == weight.shape == (0, k)
    assert counts.tolist() == [0] * 9 and gate_sum.tolist() == [0.0] * 9


def test_launcher_checks_inputs(device, launch):
    with pytest.raises(ValueError, match="dtype"):
        launch("topk_gating", torch.zeros(4, 8, dtype=torch.int64, device=device), 1)
    with pytest.raises(ValueError, match="dimensions"):
        launch("topk_gating", torch.zeros(4, 8, 2, device=device), 1)
    with pytest.raises(ValueError, match="k must lie"):
        launch("topk_gating", torch.zeros(4, 3, device=device), 4)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_nan_and_inf_rows_get_valid_distinct_ids(k, device, launch):
    logits = torch.randn(6, 5)
    logits[0] = float("nan")                      # all NaN
    logits[1, 2] = float("nan")                   # one NaN: the others decide
    logits[2, 3] = float("inf")                   # +inf wins
    logits[3] = float("-inf")                     # all -inf
    logits[4, :3] = float("nan")
    logits = logits.to(device)
    got = launch("topk_gating", logits, k)[0]
    ref = topk_gating_torch(logits, k)[0]
    assert torch.equal(got, ref)
    assert ((got >= 0) & (got < 5)).all()
    assert all(len(set(r)) == k for r in got.tolist())
    assert got[2, 0] == 3
    assert 2 not in got[1, : min(k, 4)].tolist()  # a NaN logit counts as -inf
    assert int(launch("topk_gating", logits, k)[2].sum()) == 6 * k  # counts still sum to T * k
