"""The whole layer on 2 gloo ranks: ``kernels="triton"`` (interpreted) gives the outputs of
``kernels="torch"``: the same routes, counts and plans exactly, outputs to fp32 rounding."""

import pytest

pytest.importorskip("triton")

import kernel_workers as kw  # noqa: E402
from ds_moe_replicate.testing import run_ranks  # noqa: E402


def test_triton_and_torch_layers_agree(monkeypatch):
    # NOTE: the spawned ranks inherit the variable, so they import triton in interpreter mode.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    results = run_ranks(kw.triton_vs_torch, 2, timeout=300)
    worst = max((s.diff, s.scale) for r in results for c in r for s in c)
    print(f"max abs diff triton vs torch: {worst[0]:.2e} (output scale {worst[1]:.1f})")
    for per_case in results:
        for per_step in per_case:
            for s in per_step:
                assert s.shape_ok and s.exp_counts_equal and s.counts_equal and s.rank_tokens_equal
                assert s.versions[0] == s.versions[1]
                # The gate weights differ only by the rounding of exp (interpreter vs PyTorch).
                assert s.diff <= 1e-6 * max(1.0, s.scale) and s.l_aux_diff <= 1e-6, s
    steps = results[0][0]
    assert len({s.versions[0] for s in steps}) >= 3  # plans changed while comparing
    assert max(s.replicas for s in steps) >= 1
    assert sum(s.dropped for s in results[0][3]) > 0  # the capacity case dropped routes
