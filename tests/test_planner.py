"""Planner: plan validity, conservation, optimality guards, determinism, edge cases, bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_moe_replicate import ReplicaPlan, balancedness, max_rank_load_lower_bound, plan_replicas, split_loads
from ds_moe_replicate.planner import home_plan


@st.composite
def problems(draw):
    """(load [L, E], W, S) with E a multiple of W; loads skewed, sparse or flat."""
    W = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    e_loc = draw(st.integers(1, 4))
    S = draw(st.integers(0, 3))
    L = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["zipf", "sparse", "uniform", "ints"]))
    rng = np.random.default_rng(seed)
    E = W * e_loc
    if kind == "zipf":
        a = rng.uniform(0.5, 2.0)
        load = np.stack([rng.permutation(1000.0 / np.arange(1, E + 1) ** a) for _ in range(L)])
    elif kind == "sparse":
        load = rng.integers(0, 50, (L, E)) * (rng.random((L, E)) < 0.3)
    elif kind == "uniform":
        load = rng.random((L, E)) * 10
    else:
        load = rng.integers(0, 10_000, (L, E))
    return load.astype(np.float64), W, S


def check_plan(plan: ReplicaPlan, load: np.ndarray, W: int, S: int) -> None:
    L, E = load.shape
    e_loc, K = E // W, E // W + S
    P = W * K
    phy = plan.phy2log.numpy()
    assert phy.shape == (L, P) and plan.slot_load.shape == (L, P) and plan.rank_load.shape == (L, W)
    assert plan.logcnt.shape == (L, E) and plan.log2phy.shape[:2] == (L, E)
    slot_rank = np.arange(P) // K
    is_home = np.arange(P) % K < e_loc
    # Home placement is DeepSpeed's and never moves.
    assert (phy[:, is_home] == np.arange(E)).all()
    assert ((phy[:, ~is_home] >= -1) & (phy[:, ~is_home] < E)).all()
    log2phy, logcnt = plan.log2phy.numpy(), plan.logcnt.numpy()
    slot = plan.slot_load.numpy()
    for l in range(L):
        for r in range(W):
            held = phy[l, slot_rank == r]
            held = held[held >= 0]
            assert len(set(held.tolist())) == held.size, "an expert twice on one rank"
        for e in range(E):
            slots = log2phy[l, e][log2phy[l, e] >= 0]
            assert slots.size == logcnt[l, e] == (phy[l] == e).sum()
            assert (log2phy[l, e, logcnt[l, e]:] == -1).all()
            assert (np.diff(slots) > 0).all(), "log2phy lists slots in ascending order"
            home = slots[is_home[slots]]
            assert home.size == 1 and slot_rank[home[0]] == e // e_loc
            assert (phy[l, slots] == e).all()
            # Conservation: an expert's copies share exactly its load.
            np.testing.assert_allclose(slot[l, slots].sum(), load[l, e], rtol=1e-9, atol=1e-6)
    assert (slot >= -1e-9).all()
    assert (slot[phy < 0] == 0).all()
    np.testing.assert_allclose(plan.rank_load.numpy(), slot.reshape(L, W, K).sum(axis=2), rtol=1e-12, atol=1e-9)
    assert ((logcnt - 1).sum(axis=1) <= W * S).all()


@settings(max_examples=60, deadline=None)
@given(problems())
def test_plans_are_valid_and_conserve_load(problem):
    load, W, S = problem
    plan = plan_replicas(load, W, S)
    check_plan(plan, load, W, S)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_plan_never_worse_than_no_replication_and_never_below_the_bound(problem):
    load, W, S = problem
    plan = plan_replicas(load, W, S)
    top = plan.rank_load.numpy().max(axis=1)
    home_top = home_plan(load, W).rank_load.numpy().max(axis=1)
    bound = max_rank_load_lower_bound(load, W, S).numpy()
    assert (top <= home_top * (1 + 1e-9) + 1e-9).all()
    assert (top >= bound * (1 - 1e-9) - 1e-9).all()


@settings(max_examples=40, deadline=None)
@given(problems())
def test_integral_split_is_exact_and_deterministic(problem):
    load, W, S = problem
    counts = np.round(load).astype(np.int64)
    plan = plan_replicas(counts, W, S)
    a = split_loads(torch.from_numpy(counts), plan.phy2log, W, integral=True)
    b = split_loads(counts.tolist(), plan.phy2log.numpy(), W, integral=True)
    assert a.dtype == torch.int64 and torch.equal(a, b)
    assert (a >= 0).all()
    phy = plan.phy2log.numpy()
    for l in range(counts.shape[0]):
        per_expert = np.bincount(phy[l][phy[l] >= 0], weights=a[l].numpy()[phy[l] >= 0], minlength=counts.shape[1])
        np.testing.assert_array_equal(per_expert, counts[l])
    rank = a.numpy().reshape(counts.shape[0], W, -1).sum(axis=2)
    home_top = home_plan(counts, W).rank_load.numpy().max(axis=1)
    assert (rank.max(axis=1) <= home_top).all()
    # Integer shares are as good as the real-valued optimum allows, up to one token per copy.
    real = split_loads(counts, plan.phy2log, W).numpy().reshape(counts.shape[0], W, -1).sum(axis=2)
    assert (rank.max(axis=1) <= real.max(axis=1) + plan.logcnt.numpy().max() + 1e-9).all()


def test_deterministic():
    rng = np.random.default_rng(3)
    load = rng.integers(0, 1000, (4, 64)).astype(float) * (rng.random((4, 64)) < 0.5)
    a, b = plan_replicas(load, 8, 2), plan_replicas(load.copy(), 8, 2)
    for name in ("phy2log", "log2phy", "logcnt", "slot_load", "rank_load"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_one_dimensional_load_gives_one_layer():
    plan = plan_replicas(torch.tensor([8.0, 1, 1, 1]), 2, 1)
    assert plan.num_layers == 1 and plan.phy2log.shape == (1, 6)
    assert plan.layer(0).rank_load.shape == (1, 2)


def test_all_load_on_one_expert_spreads_over_every_rank():
    load = np.zeros(16)
    load[5] = 1600.0
    plan = plan_replicas(load, 8, 1)
    assert plan.logcnt[0, 5] == 8
    np.testing.assert_allclose(plan.rank_load.numpy(), 200.0)
    assert balancedness(plan.rank_load).item() == pytest.approx(1.0)


def test_zero_load_places_no_replica():
    plan = plan_replicas(np.zeros((2, 8)), 4, 2)
    assert (plan.logcnt == 1).all()
    assert (plan.slot_load == 0).all()
    assert torch.equal(plan.balancedness(), torch.ones(2, dtype=torch.float64))


def test_no_slots_is_the_home_plan():
    load = np.random.default_rng(0).random((3, 12)) * 100
    plan, home = plan_replicas(load, 4, 0), home_plan(load, 4)
    assert torch.equal(plan.phy2log, home.phy2log)
    torch.testing.assert_close(plan.rank_load, home.rank_load)
    assert torch.equal(max_rank_load_lower_bound(load, 4, 0), home.rank_load.max(dim=1).values)


def test_one_expert_per_rank():
    load = np.array([[700.0, 50, 50, 50, 50, 50, 25, 25]])
    plan = plan_replicas(load, 8, 1)
    check_plan(plan, load, 8, 1)
    assert plan.balancedness().item() > 0.97
    assert plan.balancedness().item() > home_plan(load, 8).balancedness().item()


def test_single_rank_has_nothing_to_balance():
    plan = plan_replicas([5.0, 1.0, 0.0], 1, 2)
    assert (plan.logcnt == 1).all() and plan.balancedness().item() == 1.0


def test_shares_beat_an_even_split_under_fixed_home_placement():
    # Rank 0 holds the hot expert and a second busy one: its copy must take fewer tokens.
    load = np.array([[600.0, 300, 0, 0, 0, 0, 0, 0]])
    plan = plan_replicas(load, 4, 1)
    phy, cnt = plan.phy2log[0].numpy(), plan.logcnt[0].numpy()
    even_slot = np.where(phy >= 0, load[0, np.maximum(phy, 0)] / cnt[np.maximum(phy, 0)], 0)
    even_top = even_slot.reshape(4, -1).sum(axis=1).max()
    top = plan.rank_load.max().item()
    assert top <= 0.7 * even_top  # 233 vs 350 for this placement
    assert top <= 1.05 * max_rank_load_lower_bound(load, 4, 1).item()  # the bound is 225


def test_lower_bound_is_tight_for_a_single_hot_expert():
    load = np.array([[800.0, 0, 0, 0]])
    assert max_rank_load_lower_bound(load, 4, 1).item() == pytest.approx(200.0)
    assert max_rank_load_lower_bound(load, 4, 0).item() == pytest.approx(800.0)


def test_integral_split_balances_real_counts_on_a_plan():
    plan = plan_replicas(np.array([100.0, 10, 10, 10]), 2, 1)
    shares = split_loads(torch.tensor([101, 9, 10, 10]), plan.phy2log, 2, integral=True)
    rank = shares.view(2, -1).sum(dim=1)
    assert rank.tolist() in ([65, 65], [65, 65])
    assert int(shares.sum()) == 130


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(load=np.ones(6), ep_size=4, slots_per_rank=1), ValueError, "divisible by ep_size"),
        (dict(load=np.ones(4), ep_size=0, slots_per_rank=1), ValueError, "ep_size must be >= 1"),
        (dict(load=np.ones(4), ep_size=2, slots_per_rank=-1), ValueError, "slots_per_rank must be >= 0"),
        (dict(load=np.ones(4), ep_size=2.0, slots_per_rank=1), TypeError, "ep_size must be an int"),
        (dict(load=np.ones(4), ep_size=2, slots_per_rank=True), TypeError, "slots_per_rank must be an int"),
        (dict(load=-np.ones(4), ep_size=2, slots_per_rank=1), ValueError, "non-negative"),
        (dict(load=np.array([1.0, np.nan]), ep_size=2, slots_per_rank=1), ValueError, "finite"),
        (dict(load=np.ones((2, 2, 2)), ep_size=2, slots_per_rank=1), ValueError, r"shape \[E\] or \[L, E\]"),
        (dict(load=np.ones((2, 0)), ep_size=1, slots_per_rank=1), ValueError, r"shape \[E\] or \[L, E\]"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        plan_replicas(kwargs["load"], kwargs["ep_size"], kwargs["slots_per_rank"])


def test_bad_split_arguments():
    plan = plan_replicas(np.array([9.0, 1, 1, 1]), 2, 1)
    with pytest.raises(ValueError, match="whole token counts"):
        split_loads([1.5, 1, 1, 1], plan.phy2log, 2, integral=True)
    broken = plan.phy2log.clone()
    broken[0, 0] = 3
    with pytest.raises(ValueError, match="home slot"):
        split_loads([1, 1, 1, 1], broken, 2)
    twice = plan.phy2log.clone()
    twice[0, 2] = 1  # rank 0 already holds expert 1 at home
    with pytest.raises(ValueError, match="same rank"):
        split_loads([1, 1, 1, 1], twice, 2)
    with pytest.raises(ValueError, match="target_balancedness"):
        plan_replicas([1.0, 2.0], 2, 1, target_balancedness=0)
