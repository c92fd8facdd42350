"""Split arithmetic and the single-rank dispatch/combine round trip (index math in one process)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_moe_replicate.dispatch import _route_slots, combine, dispatch
from ds_moe_replicate.placement import Placement
from ds_moe_replicate.planner import plan_replicas
from ds_moe_replicate.split import capacity_transport, quotas, transport, transport_rank


@st.composite
def placements(draw):
    W = draw(st.sampled_from([2, 3, 4]))
    e_loc = draw(st.integers(1, 3))
    S = draw(st.integers(0, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    E = W * e_loc
    counts = rng.integers(0, 60, (W, E)) * (rng.random((W, E)) < 0.7)
    counts[:, rng.integers(E)] += rng.integers(0, 200, W)
    plan = plan_replicas(rng.random(E) * 100 + np.eye(E)[rng.integers(E)] * 500, W, S)
    return counts.astype(np.int64), plan.placement(), draw(st.booleans())


@settings(max_examples=80, deadline=None)
@given(placements())
def test_transport_conserves_routes_and_balances(case):
    counts, pl, local = case
    send = transport(counts, pl, prefer_local=local)
    W, E = counts.shape
    phy = pl.phy2log_P
    assert (send >= 0).all() and (send[:, phy < 0] == 0).all()
    # Every source sends each expert exactly its routes.
    per_src_expert = np.zeros((W, E), dtype=np.int64)
    for p in np.nonzero(phy >= 0)[0]:
        per_src_expert[:, phy[p]] += send[:, p]
    np.testing.assert_array_equal(per_src_expert, counts)
    # Each slot computes what the split's quotas gave it.
    quota = quotas(counts, pl)
    np.testing.assert_array_equal(send.sum(axis=0), quota)
    if local:
        C = pl.slots_per_rank_total
        for p in np.nonzero(phy >= 0)[0]:
            r = p // C
            # A source's routes stay local up to what the local copy takes.
            assert send[r, p] == min(counts[r, phy[p]], quota[p])


@settings(max_examples=60, deadline=None)
@given(placements(), st.integers(1, 40))
def test_capacity_transport_respects_capacity(case, cap):
    counts, pl, local = case
    W, E = counts.shape
    capacity = np.full(W, cap) + np.arange(W)
    send = capacity_transport(counts, capacity, pl, prefer_local=local)
    assert (send <= capacity[:, None]).all()
    copies = np.bincount(pl.phy2log_P[pl.phy2log_P >= 0], minlength=E)
    kept = np.zeros((W, E), dtype=np.int64)
    for p in np.nonzero(pl.phy2log_P >= 0)[0]:
        kept[:, pl.phy2log_P[p]] += send[:, p]
    np.testing.assert_array_equal(kept, np.minimum(counts, capacity[:, None] * copies[None]))


def test_route_slots_follow_send_counts():
    pl = Placement.from_phy2log([0, 1, -1, 2, 3, 0], 2, 2, 1)
    expert_TK = torch.tensor([[0], [0], [1], [0], [-1], [0], [3]])
    send_P = torch.tensor([3, 1, 0, 0, 1, 1])  # expert 0: 3 to slot 0, 1 to slot 5
    slots = _route_slots(expert_TK, send_P, torch.from_numpy(pl.log2phy_ER.copy()))
    assert slots.tolist() == [0, 0, 1, 0, -1, 5, 4]


def test_placement_layout():
    pl = Placement.home(8, 4, 2)
    assert pl.phy2log_P.tolist() == [0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7, -1, -1]
    assert pl.num_replicas == 0 and pl.log2phy_ER[:, 0].tolist() == [0, 1, 4, 5, 8, 9, 12, 13]
    plan = plan_replicas([100.0, 1, 1, 1, 1, 1, 1, 1], 4, 2)
    pl = plan.placement(version=3)
    assert pl.version == 3 and pl.num_replicas == int(plan.logcnt.sum()) - 8
    assert (pl.phy2log_P[pl.log2phy_ER[0][pl.log2phy_ER[0] >= 0]] == 0).all()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_single_rank_round_trip(k):
    torch.manual_seed(0)
    T, H, E = 23, 8, 6
    x = torch.randn(T, H)
    expert_TK = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    expert_TK[3, 0] = -1
    weight = torch.rand(T, k)
    counts = torch.bincount(expert_TK[expert_TK >= 0], minlength=E).numpy()[None]
    pl = Placement.home(E, 1, 0)
    rows, meta = dispatch(x, expert_TK, transport_rank(counts, pl, 0), pl, None)
    assert rows.shape[0] == int((expert_TK >= 0).sum()) == sum(meta.slot_rows_C)
    # Slot j's rows are exactly the tokens routed to expert j.
    start = 0
    for e, n in enumerate(meta.slot_rows_C):
        tokens = sorted(torch.nonzero((expert_TK == e).any(dim=1)).flatten().tolist())
        got = sorted(int(torch.nonzero((x == r).all(dim=1))[0]) for r in rows[start:start + n])
        assert got == tokens
        start += n
    # Identity experts: combine gives the weighted sum of the token over its taken routes.
    out, failed = combine(rows * 2.0, weight, meta, None)
    expected = 2.0 * x * (weight * (expert_TK >= 0)).sum(dim=1, keepdim=True)
    torch.testing.assert_close(out, expected)
    assert failed == [0]
