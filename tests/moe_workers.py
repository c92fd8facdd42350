"""Per-rank bodies of the multi-process layer tests (importable by spawned ranks)."""

import torch
from torch import nn

from ds_moe_replicate import ReplicatedMoE


def expert(hidden: int, ffn: int) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))


def build_pair(hidden=16, ffn=32, num_experts=4, ep_size=2, k=1, replication=None, seed=0, **moe_kwargs):
    """A stock dropless MoE and a ReplicatedMoE holding the same weights, both in eval mode."""
    from deepspeed.moe.layer import MoE

    torch.manual_seed(seed)
    kwargs = dict(num_experts=num_experts, ep_size=ep_size, k=k, drop_tokens=False, use_rts=False,
                  top2_2nd_expert_sampling=False)
    kwargs.update(moe_kwargs)
    stock = MoE(hidden, expert(hidden, ffn), **kwargs)
    rep = ReplicatedMoE(hidden, expert(hidden, ffn), **kwargs, replication=replication)
    # Each rank builds its own local experts with distinct weights per rank.
    torch.manual_seed(seed + 1000 * (torch.distributed.get_rank() + 1))
    for p in stock.deepspeed_moe.experts.parameters():
        nn.init.normal_(p, std=0.5)
    # The gate is replicated across ranks: the same weights everywhere.
    torch.manual_seed(seed + 7)
    nn.init.normal_(stock.deepspeed_moe.gate.wg.weight, std=1.0)
    missing = rep.load_state_dict(stock.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    stock.set_deepspeed_parallelism()
    rep.set_deepspeed_parallelism()
    return stock.eval(), rep.eval()


def skewed(tokens: int, hidden: int, gate_weight: torch.Tensor, hot: int, share: float, seed: int) -> torch.Tensor:
    """[tokens, hidden] where about ``share`` of the tokens route to expert ``hot``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    n_hot = int(round(share * tokens))
    direction = gate_weight[hot] / gate_weight[hot].norm()
    x[:n_hot] += 6.0 * direction
    return x[torch.randperm(tokens, generator=g)]
