"""Training with replicas through ``deepspeed.initialize`` + Adam on real gloo ranks: every loss
and every parameter equal a stock ``MoE`` dropless run from the same weights, while copies serve
most steps and send their gradients home."""

import pytest

import train_workers as tw
from ds_moe_replicate.testing import run_ranks

REL = 1e-5


def _check(run, steps, rel=REL):
    assert len(run.rep_losses) == len(run.stock_losses) == steps
    for a, b in zip(run.stock_losses, run.rep_losses):
        assert abs(a - b) <= rel * max(abs(a), 1e-12), (run.stock_losses, run.rep_losses)
    assert run.max_rel_param_diff <= rel, run.max_rel_param_diff
    assert all(run.trained_replicated)
    assert sum(n >= 1 for n in run.replicas) >= steps // 2, run.replicas  # copies active on most steps


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_two_ranks_fp32_every_zero_stage(zero):
    for run in run_ranks(tw.train_pair, 2, zero, "fp32", 0, 20, timeout=300):
        _check(run, 20)


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_four_ranks_fp32_every_zero_stage(zero):
    for run in run_ranks(tw.train_pair, 4, zero, "fp32", 0, 20, timeout=400):
        _check(run, 20)


def test_expert_and_data_parallel_world4_ep2_with_accumulation():
    for run in run_ranks(tw.train_pair, 4, 1, "fp32", 2, 10, 2, timeout=400):
        _check(run, 20)


@pytest.mark.parametrize("predictor", ["lookahead", "oracle"])
def test_other_predictors_train_exactly(predictor):
    for run in run_ranks(tw.train_pair, 2, 0, "fp32", 0, 12, 1, predictor, timeout=300):
        _check(run, 12)


def test_bf16_within_bf16_tolerance():
    for run in run_ranks(tw.train_pair, 2, 0, "bf16", 0, 10, timeout=300):
        _check(run, 10, rel=2e-2)


@pytest.mark.parametrize("replicated", [True, False])
def test_checkpoint_round_trip_continues_with_equal_losses(replicated):
    for run in run_ranks(tw.train_pair, 2, 1, "fp32", 0, 12, 1, "ema", 6, replicated, timeout=300):
        _check(run, 12)
        for a, b in zip(run.rep_losses[6:], run.resumed_losses):
            assert abs(a - b) <= REL * max(abs(a), 1e-12)
        assert len(run.resumed_losses) == 6
