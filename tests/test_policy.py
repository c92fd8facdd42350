"""The replication policy in one process: decisions from gathered numbers, no process group."""

import numpy as np
import pytest

from ds_moe_replicate.config import ReplicationConfig
from ds_moe_replicate.policy import ReplicationPolicy

E, W = 8, 2
UNIFORM = np.full(E, 500.0)
HOT = np.array([2000.0] + [300.0] * (E - 1))


def policy(**kw):
    return ReplicationPolicy(ReplicationConfig(enabled=True, slots_per_rank=1, replan_interval=1, **kw), E, W)


def all_valid(pl):
    return np.ones(pl.phy2log_P.size, dtype=bool)


@pytest.mark.parametrize("grad", [False, True])
def test_replicates_only_when_it_pays(grad):
    p = policy()
    assert p.plan(UNIFORM + np.arange(E), grad).num_replicas == 0  # even routing: no copy pays
    assert p.plan(HOT, grad).num_replicas >= 1


def test_training_counts_the_gradient_too():
    # A mild skew worth one copy's weights once, but not weights out and gradients back each step.
    # Rank loads 2180 / 1820 (mean 2000): balancing saves up to 180 tokens of the largest rank.
    load = np.array([680.0] + [500.0] * 3 + [455.0] * 4)
    p = policy(replica_cost=0.06)  # 120 tokens per copy, 240 in training
    assert p.plan(load, grad=False).num_replicas >= 1
    assert p.plan(load, grad=True).num_replicas == 0
    assert policy(replica_cost=0.0).plan(load, grad=True).num_replicas >= 1  # free copies: always


def test_history_plans_after_a_step_and_serves_once_landed():
    p = policy()
    d = p.decide(HOT, True, all_valid, grad=False)
    assert d.placement.num_replicas == 0 and d.prefetch is None
    new = p.close(HOT, d.placement, grad=False)
    assert new is not None and new.num_replicas >= 1  # its copies start moving now
    late = p.decide(HOT, False, all_valid, grad=False)  # not landed on every rank yet
    assert late.late and late.placement.num_replicas == 0
    assert p.close(HOT, late.placement, grad=False) is None  # nothing new while one is in flight
    d = p.decide(HOT, True, all_valid, grad=False)
    assert d.activated and d.placement is new


def test_stale_copies_serve_nothing_and_are_moved_again():
    p = policy()
    p.close(HOT, p.active, grad=False)
    p.decide(HOT, True, all_valid, grad=False)
    active = p.active
    stale = lambda pl: (pl.phy2log_P >= 0) & (np.arange(pl.phy2log_P.size) % 5 < 4)  # noqa: E731
    d = p.decide(HOT, True, stale, grad=False)
    assert d.placement.num_replicas == 0 and d.placement.version == active.version
    assert p.close(HOT, d.placement, grad=False) is active  # the same plan's copies, moved again


def test_oracle_plans_this_step_and_waits():
    p = policy(predictor="oracle")
    d = p.decide(HOT, True, all_valid, grad=False)
    assert d.prefetch_now and d.placement is d.prefetch and d.placement.num_replicas >= 1


def test_training_uses_the_plan_at_once():
    p = policy()
    p.close(HOT, p.active, grad=True)
    d = p.decide(HOT, True, all_valid, grad=True)
    assert d.placement.num_replicas >= 1 and d.prefetch is None and not d.late


def test_ahead_predictions_prefetch_before_the_layer_runs():
    p = policy(predictor="lookahead")
    p.driven = True
    new = p.offer(HOT, grad=False)
    assert new is not None and new.num_replicas >= 1
    d = p.decide(HOT, True, all_valid, grad=False)
    assert d.activated and d.placement is new
