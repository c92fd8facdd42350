"""Replica slots: transfer lists, weight views, and real moves between ranks with encoded weights."""

import numpy as np
import pytest
import torch
from torch import nn

import moe_workers as mw
from ds_moe_replicate.placement import Placement, Transfer, plan_transfers
from ds_moe_replicate.replicas import ReplicaStore, ReplicaTable, flatten_expert
from ds_moe_replicate.testing import run_ranks


def test_plan_transfers_lists_changed_slots_in_slot_order():
    old = Placement.from_phy2log([0, 1, 3, 2, 3, -1], 2, 2, 1)
    new = Placement.from_phy2log([0, 1, 2, 2, 3, 0], 2, 2, 1)
    assert plan_transfers(old, new) == [Transfer(expert=2, src=1, dst=0, slot=0),
                                        Transfer(expert=0, src=0, dst=1, slot=0)]
    assert plan_transfers(new, new) == []
    # Emptying a slot moves nothing.
    assert plan_transfers(new, Placement.home(4, 2, 1)) == []


def test_store_views_and_functional_run():
    torch.manual_seed(0)
    expert = mw.expert(8, 12)
    store = ReplicaStore(expert, 2)
    store.ensure(next(expert.parameters()))
    store.buffers[1].copy_(flatten_expert(expert))
    x = torch.randn(5, 8)
    torch.testing.assert_close(torch.func.functional_call(expert, store.params(1), (x,)), expert(x))
    # Views share memory with the slot's flat row; one buffer per slot (a slot costs one expert).
    store.params(0)["0.weight"].fill_(3.0)
    assert store.buffers[0, : 8 * 12].eq(3.0).all()
    assert store.buffers.shape == (2, sum(p.numel() for p in expert.parameters()))
    assert not store.in_flight and store.poll()
    assert store.bytes_per_replica == sum(p.numel() for p in expert.parameters()) * 4


def test_table_marks_copies_stale_when_a_version_changes():
    home = Placement.home(4, 2, 1)
    new = Placement.from_phy2log([0, 1, 2, 2, 3, 0], 2, 2, 1, version=1)
    table = ReplicaTable(6)
    transfers = plan_transfers(home, new)
    assert not table.valid(new, np.array([5, 7]))[[2, 5]].any()  # nothing resident yet
    table.begin(transfers, new, np.array([5, 7]))
    assert not table.valid(new, np.array([5, 7]))[[2, 5]].any()  # in flight
    table.commit()
    assert table.valid(new, np.array([5, 7])).all()
    # Rank 0's weights changed: the copy of its expert 0 on rank 1 (slot 5) is stale, and so is
    # the copy rank 0 holds (slot 2: its buffers may have been re-made with its weights).
    assert table.valid(new, np.array([6, 7])).tolist() == [True, True, False, True, True, False]
    # A different expert planned in a slot than the one resident there: not valid either.
    other = Placement.from_phy2log([0, 1, 3, 2, 3, 0], 2, 2, 1, version=2)
    assert table.valid(other, np.array([5, 7])).tolist() == [True, True, False, True, True, True]
    # A plan that empties a slot still holding an old copy: the empty slot needs nothing, so the
    # placement serves as it is (no rebuilt placement, no copies requested again every step).
    emptied = Placement.from_phy2log([0, 1, -1, 2, 3, 0], 2, 2, 1, version=3)
    valid = table.valid(emptied, np.array([5, 7]))
    assert valid.all()
    assert emptied.without(~valid) is emptied
    assert emptied.without(np.array([False, False, True, False, False, False])) is emptied
    # The answer follows the table: a new transfer into slot 5 makes it stale until it lands.
    table.begin([Transfer(expert=1, src=0, dst=1, slot=0)], other, np.array([5, 7]))
    assert not table.valid(emptied, np.array([5, 7]))[5]


def test_store_follows_dtype_and_refuses_what_it_cannot_copy():
    expert = mw.expert(4, 4)
    store = ReplicaStore(expert, 1)
    store.ensure(torch.zeros(1, dtype=torch.float16))
    assert store.buffers.dtype == torch.float16 and store.params(0)["2.bias"].dtype == torch.float16
    with pytest.raises(NotImplementedError, match="buffers"):
        ReplicaStore(nn.BatchNorm1d(4), 1)
    mixed = mw.expert(4, 4)
    mixed[0].half()
    with pytest.raises(NotImplementedError, match="one parameter dtype"):
        ReplicaStore(mixed, 1)


def test_replica_weights_always_match_their_slot_across_moves():
    results = run_ranks(mw.encoded_replicas, 4)
    assert all(r.checks > 0 for r in results)
    assert sum(r.bytes_received for r in results) > 0


def _random_placement(rng) -> Placement:
    """Home placement of random sizes plus replicas of random experts in most replica slots."""
    W, e_loc, S = int(rng.integers(1, 9)), int(rng.integers(1, 5)), int(rng.integers(0, 3))
    E, C = W * e_loc, e_loc + S
    phy = Placement.home(E, W, S).phy2log_P.copy()
    for r in range(W):
        for j in range(S):
            if rng.random() < 0.7:
                phy[r * C + e_loc + j] = int(rng.integers(E))
    return Placement.from_phy2log(phy, W, e_loc, S)


def test_compiled_validity_equals_its_numpy_twin():
    """The replica table's validity check, compiled and in NumPy, on random tables and placements."""
    from ds_moe_replicate import native

    if not native.available():
        pytest.skip("no C compiler")
    rng = np.random.default_rng(5)
    for _ in range(40):
        pl = _random_placement(rng)
        phy, E = pl.phy2log_P, pl.num_experts
        table = ReplicaTable(phy.size)
        table.expert_P[:] = np.where(rng.random(phy.size) < 0.8, phy, rng.integers(-1, E, phy.size))
        table.home_version_P[:] = rng.integers(0, 3, phy.size)
        table.holder_version_P[:] = rng.integers(0, 3, phy.size)
        version_W = rng.integers(0, 3, pl.ep_size)
        compiled = table._valid(pl, version_W)
        np.testing.assert_array_equal(compiled, table._valid_numpy(pl, version_W))
        assert compiled.dtype == bool


def test_missing_transfers_are_the_copies_a_placement_without_the_stale_slots_lacks():
    """``missing_transfers(new, valid)`` is ``plan_transfers(new.without(~valid), new)``."""
    from ds_moe_replicate.placement import missing_transfers

    rng = np.random.default_rng(9)
    for _ in range(60):
        new = _random_placement(rng)
        phy, C, e_loc = new.phy2log_P, new.slots_per_rank_total, new.experts_per_rank
        valid = (rng.random(phy.size) < 0.5) | ((np.arange(phy.size) % C) < e_loc) | (phy < 0)
        want = plan_transfers(new.without(~valid), new)
        assert missing_transfers(new, valid) == want
        assert all(not valid[t.dst * C + e_loc + t.slot] for t in want)
