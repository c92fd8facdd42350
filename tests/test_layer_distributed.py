"""ReplicatedMoE on real gloo processes (2 and 4 ranks) against the stock DeepSpeed layer."""

import pytest

import moe_workers as mw
from ds_moe_replicate.testing import run_ranks

TOL = 1e-5


@pytest.mark.parametrize("k, num_experts", [(1, 4), (2, 4), (4, 8)])
def test_matches_stock_dropless_while_plans_change(k, num_experts):
    results = run_ranks(mw.compare_with_stock, 2, k, num_experts, 14, 2)
    for r in results:
        assert max(r.diff) <= TOL, r.diff
        assert max(r.l_aux_diff) <= 1e-6
        assert all(r.counts_equal)
        assert r.hook_calls == 14
    # The run really moved replicas and switched plans several times.
    versions = results[0].versions
    assert len(set(versions)) >= 3, versions
    assert results[0].bytes_moved > 0
    assert max(results[0].replicas) >= 1
    # Every rank agrees on the plan at every step.
    assert all(r.versions == versions for r in results)


def test_four_ranks_one_hot_expert_balanced():
    results = run_ranks(mw.one_hot_expert_balance, 4)
    for per_step in results:
        assert max(s.diff for s in per_step) <= TOL
    # After the first plan lands, tokens computed per rank are balanced.
    balance = [s.balancedness for s in results[0][2:]]
    counts = results[0][-1].counts_E
    assert max(counts) / sum(counts) > 0.4  # one expert really is hot
    assert min(balance) >= 0.9, balance
    assert results[0][0].balancedness < 0.7  # before any replica: the stock imbalance


@pytest.mark.parametrize("k", [1, 2])
def test_uneven_and_empty_ranks_match_a_dense_reference(k):
    results = run_ranks(mw.uneven_tokens, 2, k)
    for r in results:
        assert max(r.diffs) <= TOL, r.diffs


def test_capacity_mode_drops_fewer_tokens_than_stock():
    drops = run_ranks(mw.capacity_drops, 2, 1)[0]
    stock, ours = drops.stock, drops.ours
    assert sum(stock) > 0
    assert sum(ours) < sum(stock), (stock, ours)
    # Once replicas are active, every step drops fewer.
    assert all(o < s for o, s in zip(ours[1:], stock[1:])), (stock, ours)


@pytest.mark.parametrize("where", ["input", "expert"])
def test_error_on_one_rank_is_raised_on_every_rank(where):
    messages = run_ranks(mw.error_on_one_rank, 2, where, timeout=120)
    assert all(m != "no error" for m in messages), messages
    assert "rank 1" in messages[1]
    assert "1" in messages[0] and "stops too" in messages[0]
    if where == "input":
        assert "hidden_size=16" in messages[1]


def test_disabled_is_stock_and_training_replicates_with_stock_gradients():
    for run in run_ranks(mw.disabled_and_training, 2):
        assert run.off_diff == 0.0
        for s in run.steps:
            assert s.rel_grad_diff <= 1e-6 and s.input_grad_diff <= 1e-6
            assert s.training
        assert all(s.replicas >= 1 for s in run.steps[1:])  # copies computed and sent gradients home


def test_used_token_and_residual_match_stock():
    for per_step in run_ranks(mw.used_token_and_residual, 2):
        for s in per_step:
            assert s.diff <= TOL and s.l_aux_diff <= 1e-6 and s.counts_equal


def test_json_toggle_through_deepspeed_initialize():
    for results in run_ranks(mw.deepspeed_initialize_toggle, 2):
        assert results == [mw.Toggle(enabled=False, replicated_ran=False), mw.Toggle(enabled=True, replicated_ran=True)]
