"""A small Switch-style model, built in (random weights, no download), for the main job and tests.

Token embeddings, then pre-LayerNorm residual blocks whose feed-forward is a dense FFN in even
blocks and a Mixture-of-Experts layer in odd ones (Switch Transformers put an MoE layer every
other block), then a final LayerNorm and a tied output head. Attention is left out: it does not
touch expert dispatch, which is what this model exercises, and it would dominate CPU time.

Skew is planted, not faked: each "topic" has a direction that is added to the embeddings of its
block of tokens and to the gate row of one hot expert per MoE layer (a different expert per
topic), so batches rich in a topic's tokens send most of their tokens to that topic's experts
through the model's own gates.

Legend: B batch, S sequence, T = B * S tokens, H hidden, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

import torch
from torch import nn

from .testing.fixtures import expert_mlp

__all__ = ["TinySwitchConfig", "TinySwitch", "topic_tokens", "build_tiny_switch"]


@dataclass(frozen=True)
class TinySwitchConfig:
    vocab: int = 1024
    hidden: int = 256
    ffn: int = 1024
    blocks: int = 4
    num_experts: int = 8
    k: int = 1
    topic_tokens: int = 64
    topic_strength: float = 4.0
    topics: int = 2
    seed: int = 0


class _Block(nn.Module):
    def __init__(self, hidden: int, ffn: nn.Module, is_moe: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.ffn = ffn
        self.is_moe = is_moe

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.ffn(self.norm(h))
        return h + (y[0] if self.is_moe else y)


class TinySwitch(nn.Module):
    """``moe_factory(hidden, expert, num_experts, k)`` builds each MoE layer (stock or replicated)."""

    def __init__(self, cfg: TinySwitchConfig, moe_factory: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        blocks: List[nn.Module] = []
        for i in range(cfg.blocks):
            if i % 2:
                blocks.append(_Block(cfg.hidden, moe_factory(cfg.hidden, expert_mlp(cfg.hidden, cfg.ffn),
                                                             cfg.num_experts, cfg.k), True))
            else:
                blocks.append(_Block(cfg.hidden, expert_mlp(cfg.hidden, cfg.ffn), False))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.topic_dirs = torch.randn(cfg.topics, cfg.hidden, generator=g)
        self.topic_dirs /= self.topic_dirs.norm(dim=1, keepdim=True)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with torch.no_grad():
            for t in range(cfg.topics):
                self.embed.weight[t * cfg.topic_tokens:(t + 1) * cfg.topic_tokens] += \
                    cfg.topic_strength * self.topic_dirs[t]
            for j, block in enumerate(self.moe_blocks()):
                wg = block.ffn.deepspeed_moe.gate.wg.weight
                scale = cfg.topic_strength * wg.norm(dim=1).mean()
                for t in range(cfg.topics):
                    wg[self.hot_expert(j, t)] += scale * self.topic_dirs[t]
                # Each rank holds different experts: their weights must differ across ranks
                # (everything else is the same on every rank, as in data parallelism).
                eg = torch.Generator().manual_seed(cfg.seed + 1000 * (rank + 1) + j)
                for p in block.ffn.deepspeed_moe.experts.parameters():
                    p.copy_(torch.randn(p.shape, generator=eg) / p.shape[-1] ** 0.5)

    def hot_expert(self, moe_index: int, topic: int) -> int:
        """The expert topic ``topic`` sends its tokens to in MoE layer ``moe_index`` (topics differ)."""
        return (moe_index + topic * (self.cfg.num_experts // 2 + 1)) % self.cfg.num_experts

    def moe_blocks(self) -> List[_Block]:
        return [b for b in self.blocks if b.is_moe]

    def moe_layers(self) -> List[nn.Module]:
        return [b.ffn for b in self.moe_blocks()]

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens_BS)
        for block in self.blocks:
            h = block(h)
        # Tied output head, rescaled by H^-0.5 as T5 / Switch do with tied embeddings.
        return (self.norm(h) @ self.embed.weight.t()) * self.cfg.hidden ** -0.5


def topic_tokens(cfg: TinySwitchConfig, batch: int, seq: int, topic_share: float, seed: int,
                 topic: int = 0) -> torch.Tensor:
    """[B, S] token ids: a fraction ``topic_share`` from topic ``topic``'s block, the rest from
    outside every topic block."""
    if not 0 <= topic < cfg.topics:
        raise ValueError(f"topic must lie in [0, {cfg.topics}), got {topic}")
    g = torch.Generator().manual_seed(seed)
    first = cfg.topics * cfg.topic_tokens
    tokens = torch.randint(first, cfg.vocab, (batch, seq), generator=g)
    chosen = torch.rand(batch, seq, generator=g) < topic_share
    topical = torch.randint(0, cfg.topic_tokens, (batch, seq), generator=g) + topic * cfg.topic_tokens
    return torch.where(chosen, topical, tokens)


def build_tiny_switch(cfg: TinySwitchConfig, ep_size: int, replicated: bool = False, capacity: bool = False,
                      set_groups: bool = True) -> TinySwitch:
    """The model with ``ReplicatedMoE`` layers (replication off until configured) if
    ``replicated``, else stock ``deepspeed.moe.layer.MoE`` ones, dropless unless ``capacity``
    (then capacity factor 1.0); expert-parallel groups set unless ``set_groups`` is False
    (``deepspeed.initialize`` sets them); in eval mode."""
    from deepspeed.moe.layer import MoE

    from .layer import ReplicatedMoE

    def factory(hidden, expert, num_experts, k):
        common = dict(num_experts=num_experts, ep_size=ep_size, k=k, use_rts=False, top2_2nd_expert_sampling=False)
        if replicated:
            return ReplicatedMoE(hidden, expert, drop_tokens=False, **common)
        if capacity:
            return MoE(hidden, expert, drop_tokens=True, capacity_factor=1.0, eval_capacity_factor=1.0,
                       min_capacity=4, **common)
        return MoE(hidden, expert, drop_tokens=False, **common)

    model = TinySwitch(cfg, factory)
    if set_groups:
        for layer in model.moe_layers():
            layer.set_deepspeed_parallelism()
    return model.eval()


def add_tiny_switch_args(ap, batch: int = 4, seq: int = 512) -> None:
    """The command-line sizes of the built-in Switch-style model (TinySwitchConfig)."""
    ap.add_argument("--batch", type=int, default=batch, help="sequences per rank per forward")
    ap.add_argument("--seq", type=int, default=seq, help="tokens per sequence")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=4, help="blocks; every other one is an MoE layer")
    ap.add_argument("--experts", type=int, default=8)
