"""replace_moe_blocks on tiny random Hugging Face MoE models: logits equal to the original's (fp32,
dropless) on 1 and 2 gloo ranks, router logits and aux losses still reported, each rank holding
only its own experts."""

import pytest

pytest.importorskip("transformers")

import hf_workers as hw  # noqa: E402
from ds_moe_replicate.testing import run_ranks  # noqa: E402

TOL = 1e-5


def _check(results, name, ep_size, mode):
    E_loc = None
    for rank, r in enumerate(results):
        assert max(r.diffs) <= TOL, (name, mode, rank, r.diffs)
        for a, b in r.losses:
            assert a.keys() == b.keys() and a, (a, b)
            for k in a:
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])
        # Every MoE layer's router logits still reach the output.
        assert all(x == y and x > 0 for x, y in r.recorded), r.recorded
        assert r.gate_shared
        # Rank r holds experts r*E_loc .. (r+1)*E_loc-1, each exactly once.
        E_loc = len(r.held)
        assert r.held == [[rank * E_loc + j] for j in range(E_loc)], r.held
        assert r.corrupted > 1e-3  # the comparison can fail
        if mode == "replicated":
            assert r.replicated_steps, "the replicated path did not run"
    return E_loc


ONE_RANK = [(name, "replicated") for name in hw.FAMILIES]
# Qwen2-MoE also on the stock DeepSpeed layer: norm_topk_prob=False, a shared expert, k = 2.
TWO_RANKS = [(name, "replicated") for name in ("switch", "mixtral", "qwen2_moe", "olmoe")] + [("qwen2_moe", "stock")]


@pytest.fixture(scope="module")
def one_rank():
    return run_ranks(hw.compare_many, 1, ONE_RANK, 1)


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(hw.compare_many, 2, TWO_RANKS, 2)


@pytest.mark.parametrize("name, mode", ONE_RANK)
def test_one_rank_matches_transformers(one_rank, name, mode):
    _check([r[f"{name}/{mode}"] for r in one_rank], name, 1, mode)


@pytest.mark.parametrize("name, mode", TWO_RANKS)
def test_two_ranks_match_transformers(two_ranks, name, mode):
    E_loc = _check([r[f"{name}/{mode}"] for r in two_ranks], name, 2, mode)
    assert E_loc == 2  # 4 experts over 2 ranks


def test_unknown_model_is_refused():
    import torch

    from ds_moe_replicate.hf import replace_moe_blocks

    with pytest.raises(ValueError, match="no sparse MLP block"):
        replace_moe_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))
