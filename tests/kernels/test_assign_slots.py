"""Slot assignment (slot, send row, send order) against its PyTorch twin and against the
dispatch contract: rows grouped by slot, route order inside a slot, ``send_P`` rows per slot."""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from ds_moe_replicate.gating import drop_over_capacity  # noqa: E402
from ds_moe_replicate.kernels.assign_slots import assign_slots_torch  # noqa: E402
from ds_moe_replicate.planner import plan_replicas  # noqa: E402
from ds_moe_replicate.split import capacity_transport, transport  # noqa: E402


def case(T, k, W, e_loc, S, rank, seed, capacity=None, drop=0.0):
    """Routes of rank ``rank`` with a hot expert, a placement with replicas, and its split."""
    rng = np.random.default_rng(seed)
    E = W * e_loc
    hot = int(rng.integers(E))
    p = np.full(E, 0.3 / (E - 1))
    p[hot] = 0.7
    expert = np.stack([rng.permutation(E)[:k] if rng.random() > 0.5 else
                       np.r_[hot, rng.permutation(np.delete(np.arange(E), hot))[:k - 1]] for _ in range(T)])
    expert = expert.reshape(T, k).astype(np.int64)
    expert[rng.random((T, k)) < drop] = -1  # routes not taken (k = 1 with used_token)
    counts_WE = rng.integers(0, 3 * T * k // E + 1, (W, E))
    counts_WE[rank] = np.bincount(expert[expert >= 0], minlength=E)
    plan = plan_replicas(counts_WE.sum(axis=0).astype(float) + 1, W, S)
    pl = plan.placement()
    expert_TK = torch.from_numpy(expert)
    if capacity is None:
        send_WP = transport(counts_WE, pl, prefer_local=bool(seed % 2))
    else:
        send_WP = capacity_transport(counts_WE, np.full(W, capacity), pl)
        keep_E = np.bincount(np.maximum(pl.phy2log_P, 0), weights=send_WP[rank], minlength=E).astype(np.int64)
        expert_TK = drop_over_capacity(expert_TK, torch.from_numpy(keep_E))
    return expert_TK, torch.from_numpy(send_WP[rank].copy()), torch.from_numpy(pl.log2phy_ER.copy()), pl


def check(launch, expert_TK, send_P, copies_ER, device):
    args = (expert_TK.to(device), send_P.to(device), copies_ER.to(device))
    slot, pos, order = (t.cpu() for t in launch("assign_slots", *args))
    ref = assign_slots_torch(expert_TK, send_P, copies_ER)
    for got, want in zip((slot, pos, order), ref):
        assert got.dtype == torch.int64
        assert torch.equal(got, want)
    # The dispatch contract, independent of the twin.
    flat = expert_TK.reshape(-1)
    taken = flat >= 0
    assert torch.equal(slot < 0, ~taken) and torch.equal(pos < 0, ~taken)
    assert torch.equal(order[pos[taken]], torch.nonzero(taken).flatten())
    assert torch.equal(torch.bincount(slot[taken], minlength=send_P.numel()), send_P)
    s = slot[order]
    assert bool((s[1:] >= s[:-1]).all())  # grouped by slot, so by destination rank
    same = s[1:] == s[:-1]
    assert bool((order[1:][same] > order[:-1][same]).all())  # route order inside a slot
    phy2log = torch.full((int(copies_ER.max()) + 1,), -1, dtype=torch.int64)
    phy2log[copies_ER[copies_ER >= 0]] = torch.nonzero(copies_ER >= 0)[:, 0]
    assert torch.equal(phy2log[slot[taken]], flat[taken])  # a copy of the route's own expert
    return slot


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("T, W, e_loc, S, rank", [(1823, 4, 3, 2, 1), (613, 3, 5, 1, 2), (97, 2, 4, 3, 0)])
def test_dropless_matches_twin(T, W, e_loc, S, rank, k, device, launch):
    expert_TK, send_P, copies_ER, pl = case(T, k, W, e_loc, S, rank, seed=T + k)
    assert pl.num_replicas > 0
    slot = check(launch, expert_TK, send_P, copies_ER, device)
    # A replicated expert's routes really are split among several copies (with enough routes).
    assert T < 100 or any(len(set(slot[expert_TK.reshape(-1) == e].tolist())) > 1 for e in range(copies_ER.shape[0]))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_capacity_mode_and_untaken_routes(k, device, launch):
    expert_TK, send_P, copies_ER, _ = case(781, k, 4, 2, 1, 3, seed=k, capacity=40, drop=0.1)
    assert bool((expert_TK < 0).any())
    check(launch, expert_TK, send_P, copies_ER, device)


def test_empty_and_nothing_taken(device, launch):
    copies_ER = torch.tensor([[0, 3], [1, -1], [2, -1]])
    for expert_TK in (torch.zeros(0, 2, dtype=torch.int64), torch.full((5, 2), -1, dtype=torch.int64)):
        slot = check(launch, expert_TK, torch.zeros(4, dtype=torch.int64), copies_ER, device)
        assert slot.numel() == expert_TK.numel()


def test_launcher_checks_inputs(device, launch):
    copies_ER = torch.tensor([[0, 2], [1, -1]], device=device)
    with pytest.raises(ValueError, match="dtype"):
        launch("assign_slots", torch.zeros(3, 1, dtype=torch.int32, device=device),
               torch.zeros(3, dtype=torch.int64, device=device), copies_ER)
    with pytest.raises(ValueError, match="expected expert_TK"):
        launch("assign_slots", torch.zeros(3, dtype=torch.int64, device=device),
               torch.zeros(3, dtype=torch.int64, device=device), copies_ER)
