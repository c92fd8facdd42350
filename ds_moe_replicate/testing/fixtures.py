"""Shared fixtures of the tests, the benchmarks and the main job: twin stock/replicated layers,
skewed tokens and a tiny model with embeddings. The library may use this module; it never uses
the benchmark package or the tests.

Legend: T tokens, H hidden, F expert FFN size, E logical experts, W expert-parallel ranks.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["expert_mlp", "build_pair", "steer", "share_for_hottest", "tiny_lm"]


def expert_mlp(hidden: int, ffn: int) -> nn.Module:
    """The FFN expert of Switch Transformers: Linear -> activation -> Linear."""
    return nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))


def build_pair(hidden: int = 16, ffn: int = 32, num_experts: int = 4, ep_size: int = 2, k: int = 1,
               replication: Optional[Mapping[str, Any]] = None, seed: int = 0, expert_std: float = 0.5,
               device: Optional[torch.device] = None, set_groups: bool = True,
               **moe_kwargs) -> Tuple[nn.Module, nn.Module]:
    """A stock ``deepspeed.moe.layer.MoE`` (dropless unless overridden) and a ``ReplicatedMoE``
    holding the same weights, both in eval mode with their expert-parallel groups set (unless
    ``set_groups`` is False: ``deepspeed.initialize`` sets them).

    Experts differ on every rank (each holds its own); the gate is the same everywhere.
    """
    from deepspeed.moe.layer import MoE

    from ..layer import ReplicatedMoE

    kwargs = dict(num_experts=num_experts, ep_size=ep_size, k=k, drop_tokens=False, use_rts=False,
                  top2_2nd_expert_sampling=False)
    kwargs.update(moe_kwargs)
    torch.manual_seed(seed)
    stock = MoE(hidden, expert_mlp(hidden, ffn), **kwargs)
    rep = ReplicatedMoE(hidden, expert_mlp(hidden, ffn), **kwargs, replication=replication)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(seed + 1000 * (rank + 1))
    for p in stock.deepspeed_moe.experts.parameters():
        nn.init.normal_(p, std=expert_std)
    torch.manual_seed(seed + 7)
    nn.init.normal_(stock.deepspeed_moe.gate.wg.weight, std=1.0)
    if stock.use_residual:
        for p in list(stock.mlp.parameters()) + list(stock.coefficient.parameters()):
            nn.init.normal_(p, std=expert_std)
    result = rep.load_state_dict(stock.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    if set_groups:
        stock.set_deepspeed_parallelism()
        rep.set_deepspeed_parallelism()
    if device is not None:
        stock.to(device)
        rep.to(device)
    return stock.eval(), rep.eval()


def steer(tokens: int, hidden: int, gate_weight: torch.Tensor, hot: int, share: float, seed: int,
          strength: float = 6.0) -> torch.Tensor:
    """[T, H] random tokens of which a fraction ``share`` is pushed toward expert ``hot``.

    The pushed tokens get ``strength`` along the unit direction of the hot expert's gate row, so
    the gate (unchanged) routes them there; the others route as the random gate likes.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    n_hot = int(round(share * tokens))
    if n_hot:
        direction = gate_weight[hot].float() / gate_weight[hot].float().norm()
        x[:n_hot] += strength * direction
    return x[torch.randperm(tokens, generator=g)]


def share_for_hottest(target: float, num_experts: int) -> float:
    """Fraction to steer so the hot expert gets ``target`` of all tokens (the rest spread evenly)."""
    base = 1.0 / num_experts
    return max(0.0, (target - base) / (1.0 - base))


def tiny_lm(ep_size: int, replicated: bool = True, seed: int = 0) -> nn.Module:
    """A small built-in Switch-style model with input embeddings and two MoE layers (for
    lookahead tests): vocabulary 256, hidden 32, 4 experts per layer."""
    from ..tiny_switch import TinySwitchConfig, build_tiny_switch

    cfg = TinySwitchConfig(hidden=32, ffn=64, blocks=4, num_experts=4, vocab=256, topic_tokens=32, seed=seed)
    return build_tiny_switch(cfg, ep_size, replicated=replicated)
