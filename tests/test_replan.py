"""The incremental re-plan: valid placements, never worse than home, and it keeps what serves."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_moe_replicate.placement import Placement, home_phy2log
from ds_moe_replicate.planner import plan_replicas
from ds_moe_replicate.replan import ADDED, DROPPED, HOME, KEPT, _replan_numpy, replan
from ds_moe_replicate.split import quotas


def max_rank_load(load_E, pl):
    return quotas(np.rint(load_E).astype(np.int64)[None], pl).reshape(pl.ep_size, -1).sum(axis=1).max()


@st.composite
def sequences(draw):
    W = draw(st.sampled_from([1, 2, 4, 8, 16]))
    e_loc = draw(st.integers(1, 4))
    S = draw(st.integers(0, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    E = W * e_loc
    p = 1.0 / np.arange(1, E + 1) ** draw(st.sampled_from([0.0, 0.8, 1.2, 1.6]))
    loads, perm = [], rng.permutation(E)
    for _ in range(draw(st.integers(1, 5))):
        if rng.random() < 0.4:
            perm = rng.permutation(E)  # the hot experts change
        loads.append(rng.multinomial(int(rng.integers(0, 500)) * W, p[perm] / p.sum()).astype(float))
    return W, e_loc, S, loads


@settings(max_examples=80, deadline=None)
@given(sequences())
def test_replan_gives_valid_placements_never_worse_than_home(case):
    W, e_loc, S, loads = case
    E, C = W * e_loc, e_loc + S
    home = home_phy2log(E, W, S)
    is_home = home >= 0
    pl = Placement.home(E, W, S)
    for load in loads:
        new = replan(load, pl)
        assert new.version == pl.version + 1
        phy = new.phy2log_P
        np.testing.assert_array_equal(phy[is_home], home[is_home])  # home slots never move
        assert ((phy >= -1) & (phy < E)).all()
        for r in range(W):
            held = phy[r * C:(r + 1) * C]
            held = held[held >= 0]
            assert held.size == np.unique(held).size  # no expert twice on a rank
        assert max_rank_load(load, new) <= max_rank_load(load, Placement.home(E, W, S))
        pl = new


def test_replan_keeps_a_placement_that_still_serves_and_repairs_one_that_does_not():
    rng = np.random.default_rng(3)
    E, W, S = 64, 8, 2
    p = 1.0 / np.arange(1, E + 1) ** 1.2
    load = rng.multinomial(4096 * W, p / p.sum()).astype(float)
    first = plan_replicas(load, W, S).placement(version=4)
    again = replan(load, first)
    np.testing.assert_array_equal(again.phy2log_P, first.phy2log_P)  # nothing moves
    assert again.version == 5
    # The hot experts change: the re-plan moves replicas and balances like a full plan.
    shifted = np.roll(load, 17)
    moved = replan(shifted, first)
    assert not np.array_equal(moved.phy2log_P, first.phy2log_P)
    full = plan_replicas(shifted, W, S).placement()
    mean = shifted.sum() / W
    assert mean / max_rank_load(shifted, moved) >= mean / max_rank_load(shifted, full) - 0.01
    assert mean / max_rank_load(shifted, moved) >= 0.97


def test_replan_rejects_bad_arguments():
    pl = Placement.home(8, 2, 1)
    with pytest.raises(ValueError, match="shape"):
        replan(np.ones(7), pl)
    for bad in (-np.ones(8), np.full(8, np.nan), np.full(8, np.inf), np.full(8, 1e17)):
        with pytest.raises(ValueError, match="non-negative"):
            replan(bad, pl)
    with pytest.raises(ValueError, match="target_balancedness"):
        replan(np.ones(8), pl, target_balancedness=0.0)
    with pytest.raises(ValueError, match="keep_balancedness"):
        replan(np.ones(8), pl, keep_balancedness=1.5)


@settings(max_examples=120, deadline=None)
@given(sequences(), st.sampled_from([0.9, 0.98, 0.995]), st.sampled_from([0.5, 0.95, 0.98]))
def test_the_compiled_replan_and_its_numpy_twin_give_the_same_integers(case, target, keep):
    """Ranks that could build the library and ranks that could not must plan the same."""
    from ds_moe_replicate import native, split

    if not native.available():
        pytest.skip("no C compiler: the twin is the only re-plan here")
    W, e_loc, S, loads = case
    pl = Placement.home(W * e_loc, W, S)
    for load in loads:
        lay = split._layout(pl)
        compiled = native.replan_into(load, W, e_loc, S, pl.phy_ptr, lay.native_block_ptr, split._ROUNDS, keep, target)
        twin = _replan_numpy(load, pl, target, keep)
        for a, b in zip(compiled, twin):
            np.testing.assert_array_equal(a, b)
        pl = replan(load, pl, target_balancedness=target, keep_balancedness=keep)
        np.testing.assert_array_equal(pl.phy2log_P, compiled[1])


def test_replan_moves_through_every_status_and_reports_its_rank_loads():
    """Kept, dropped, added and home, each with the rank loads of the run-time split."""
    E, W, S = 16, 4, 2
    home = Placement.home(E, W, S)
    hot = np.full(E, 10.0)
    hot[0] = 400.0
    first = replan(hot, home, with_quotas=True)
    assert first.status == ADDED and first.placement.num_replicas > 0
    assert first.plan_max == max_rank_load(hot, first.placement) < first.home_max == 430
    assert first.tokens == int(hot.sum())
    np.testing.assert_array_equal(first.quota_P, quotas(np.rint(hot).astype(np.int64)[None], first.placement))
    again = replan(hot, first.placement, with_quotas=True)
    assert again.status == KEPT and again.placement.phy2log_P is first.placement.phy2log_P
    flat = np.full(E, 10.0)
    cooled = replan(flat * 3 + np.eye(E)[5] * 60, first.placement, with_quotas=True)
    assert cooled.status in (DROPPED, ADDED)
    assert (cooled.placement.phy2log_P == 0).sum() < (first.placement.phy2log_P == 0).sum()  # copies of 0 freed
    assert replan(np.zeros(E), first.placement, with_quotas=True).status == HOME
