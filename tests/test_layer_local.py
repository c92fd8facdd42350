"""ReplicatedMoE in one process: the MoE contract, state_dict keys, configuration."""

import pytest
import torch
from deepspeed.moe.layer import MoE

from ds_moe_replicate import ReplicatedMoE, ReplicationConfig, ReplicationConfigError
from ds_moe_replicate.layer import configure_replication
from ds_moe_replicate.testing import expert_mlp


def pair(k=1, replication=None, **kw):
    torch.manual_seed(0)
    stock = MoE(16, expert_mlp(16, 32), num_experts=4, ep_size=1, k=k, drop_tokens=False, use_rts=False,
                top2_2nd_expert_sampling=False, **kw)
    rep = ReplicatedMoE(16, expert_mlp(16, 32), num_experts=4, ep_size=1, k=k, drop_tokens=False, use_rts=False,
                        top2_2nd_expert_sampling=False, replication=replication, **kw)
    rep.load_state_dict(stock.state_dict())
    return stock.eval(), rep.eval()


def test_state_dict_has_exactly_the_stock_keys_both_ways():
    stock, rep = pair(replication={"enabled": True, "slots_per_rank": 2})
    assert list(rep.state_dict().keys()) == list(stock.state_dict().keys())
    stock.load_state_dict(rep.state_dict(), strict=True)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_single_rank_replicated_path_matches_stock(k):
    stock, rep = pair(k=k, replication={"enabled": True, "slots_per_rank": 1, "replan_interval": 1})
    for step in range(3):
        x = torch.randn(2, 9, 16)
        with torch.no_grad():
            a, la, ca = stock(x)
            b, lb, cb = rep(x)
        assert b.shape == x.shape
        assert (a - b).abs().max() <= 1e-6
        torch.testing.assert_close(la, lb)
        assert torch.equal(ca, cb)
        assert rep.last_stats.step == step and rep.last_stats.num_replicas == 0  # one rank: nowhere to copy


def test_configure_switches_replication_on_and_off():
    stock, rep = pair()
    assert rep.replication.enabled is False
    x = torch.randn(12, 16)
    with torch.no_grad():
        rep(x)
    assert rep.last_stats is None  # the stock path ran
    rep.configure({"enabled": True, "slots_per_rank": 1})
    with torch.no_grad():
        rep(x)
    assert rep.last_stats is not None and rep.last_stats.step == 0

    class Engine(torch.nn.Module):  # what deepspeed.initialize returns, as far as we read it
        def __init__(self, module, config):
            super().__init__()
            self.module, self.config = module, config

    engine = Engine(torch.nn.Sequential(rep), {"moe_replication": {"enabled": False}})
    assert configure_replication(engine) == 1
    assert rep.replication.enabled is False
    assert configure_replication(engine, {"moe_replication": {"enabled": True, "slots_per_rank": 3}}) == 1
    assert rep.replication.slots_per_rank == 3


def test_bad_arguments_are_refused():
    with pytest.raises(ReplicationConfigError, match="moe_replication.slot"):
        ReplicatedMoE(16, expert_mlp(16, 32), num_experts=4, replication={"enabled": True, "slot": 1})
    with pytest.raises(ValueError, match="k must lie"):
        ReplicatedMoE(16, expert_mlp(16, 32), num_experts=4, k=5)
    with pytest.raises(ValueError, match="ds_config"):
        configure_replication(torch.nn.Linear(2, 2))
    assert isinstance(ReplicatedMoE(16, expert_mlp(16, 32), num_experts=4,
                                    replication=ReplicationConfig(enabled=True)).replication, ReplicationConfig)


def test_bad_input_names_the_problem():
    _, rep = pair(replication={"enabled": True})
    from ds_moe_replicate.comm import ReplicationError

    with pytest.raises(ReplicationError, match="hidden_size=16"):
        rep(torch.randn(3, 15))
    with pytest.raises(ReplicationError, match="used_token"):
        rep(torch.randn(3, 16), torch.ones(4))
