"""Gate step against DeepSpeed's own TopKGate (single process, dropless)."""

import pytest
import torch
from deepspeed.moe.sharded_moe import TopKGate

from ds_moe_replicate.gating import Routes, drop_over_capacity, normalized_weight_TK, route


def make_gate(hidden, experts, k, **kwargs):
    torch.manual_seed(0)
    gate = TopKGate(hidden, experts, k=k, drop_tokens=False, top2_2nd_expert_sampling=False, **kwargs).eval()
    torch.nn.init.normal_(gate.wg.weight)
    return gate


@pytest.mark.parametrize("k, experts, tokens", [(1, 8, 37), (2, 8, 53), (3, 7, 41), (4, 16, 29)])
def test_route_matches_deepspeed_dropless(k, experts, tokens):
    gate = make_gate(24, experts, k)
    x = torch.randn(tokens, 24)
    l_aux, _, _, idx_KT, _, gates_KT, counts = gate(x, None, True)
    ours = route(gate, x)
    assert torch.equal(ours.expert_TK.t().int(), idx_KT)
    torch.testing.assert_close(normalized_weight_TK(ours, k).t(), gates_KT, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.l_aux, l_aux, rtol=1e-6, atol=1e-7)
    assert torch.equal(ours.exp_counts_E, counts)


def test_used_token_masks_k1_routes():
    gate = make_gate(16, 4, 1)
    x = torch.randn(20, 16)
    used = (torch.arange(20) % 4 != 0).float()
    ours = route(gate, x, used)
    assert (ours.expert_TK[used == 0] == -1).all()
    assert (ours.expert_TK[used == 1] >= 0).all()
    assert (ours.weight_TK[used == 0] == 0).all()
    assert int(ours.exp_counts_E.sum()) == int(used.sum())


def test_empty_batch():
    gate = make_gate(16, 4, 2)
    ours = route(gate, torch.zeros(0, 16))
    assert ours.expert_TK.shape == (0, 2) and ours.weight_TK.shape == (0, 2)
    assert int(ours.exp_counts_E.sum()) == 0 and torch.isfinite(ours.l_aux)


def test_drop_over_capacity_keeps_first_routes_in_order():
    expert_TK = torch.tensor([[0, 1], [0, 2], [1, 0], [0, -1], [2, 1]])
    kept = drop_over_capacity(expert_TK, torch.tensor([2, 1, 5]))
    # expert 0: routes in order (0,0), (1,0), (2,1), (3,0) -> keep 2; expert 1: (0,1), (2,0), (4,1) -> keep 1
    assert kept.tolist() == [[0, 1], [0, 2], [-1, -1], [-1, -1], [2, -1]]


def test_weights_renormalise_over_kept_routes_for_k2():
    routes = Routes(torch.tensor([[0, 1], [2, -1]]), torch.tensor([[0.6, 0.2], [0.5, 0.3]]), torch.tensor(0.0),
                    torch.zeros(3))
    w = normalized_weight_TK(routes, 2)
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.25], [1.0, 0.0]]))
