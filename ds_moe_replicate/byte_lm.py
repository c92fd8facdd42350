"""A small causal transformer language model over bytes whose feed-forward layers are MoE layers.

Each block is pre-norm: ``x + attention(norm(x))``, then ``x + moe(norm(x))``. Attention makes
routing contextual: a token's expert depends on what came before it, not only on its byte, which
is what real MoE models route on (the built-in Switch-style model of ``tiny_switch.py`` has no
attention, so its routing is a lookup on the token id).

The MoE layer comes from a factory, so the same model runs as
- ``"replicated"``: ``ReplicatedMoE`` (replication off until configured), expert parallel;
- ``"stock"``: DeepSpeed's ``deepspeed.moe.layer.MoE``, dropless, expert parallel;
- ``"local"``: ``LocalMoE``, every expert in this process, no DeepSpeed layer and no
  communication: the reference the others are compared with.
All three have the same ``state_dict`` keys. Expert ``e`` of layer ``l`` is initialised from a
seed of (seed, l, e), so the full model does not depend on how experts are spread over ranks;
``full_state_dict`` / ``load_full_state_dict`` convert between a rank's experts and all of them.

Legend: B sequences, S positions, H hidden, V vocabulary (256 bytes), T tokens (B * S),
K routes per token, E experts, W expert-parallel ranks.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["ByteLMConfig", "ByteLM", "LocalMoE", "build_byte_lm", "full_state_dict", "load_full_state_dict",
           "expert_mlp"]

_EXPERT_KEY = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..*)$")


@dataclass(frozen=True)
class ByteLMConfig:
    """Sizes of the model.

    Attributes:
        hidden: model width H. heads: attention heads (must divide ``hidden``).
        layers: transformer blocks, each with an MoE feed-forward layer.
        experts: experts per MoE layer E (divisible by the expert-parallel size).
        k: experts per token (DeepSpeed's top-k gating; second expert not sampled).
        ffn: hidden size of each expert MLP.
        seq: longest sequence (learned positions).
        seed: initial weights.
    """

    hidden: int = 128
    heads: int = 4
    layers: int = 4
    experts: int = 16
    k: int = 1
    ffn: int = 256
    seq: int = 256
    seed: int = 0

    def to_dict(self) -> Dict[str, int]:
        return asdict(self)


def expert_mlp(hidden: int, ffn: int) -> nn.Module:
    """One expert: Linear -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"heads ({heads}) must divide hidden ({hidden})")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        B, S, H = x_BSH.shape
        q, k, v = self.qkv(x_BSH).view(B, S, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, S, H))


class _Block(nn.Module):
    def __init__(self, cfg: ByteLMConfig, moe: nn.Module) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden)
        self.attn = _Attention(cfg.hidden, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.hidden)
        self.moe = moe

    def forward(self, x_BSH: torch.Tensor):
        x_BSH = x_BSH + self.attn(self.norm1(x_BSH))
        y_BSH, l_aux, _counts = self.moe(self.norm2(x_BSH))
        return x_BSH + y_BSH, l_aux


class ByteLM(nn.Module):
    """``forward(tokens [B, S]) -> logits [B, S, V]``; ``l_aux`` holds the sum of the MoE layers'
    load-balancing losses of the last forward."""

    def __init__(self, cfg: ByteLMConfig, moe_factory: Callable[[int, nn.Module, int, int], nn.Module]) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(256, cfg.hidden)
        self.pos = nn.Embedding(cfg.seq, cfg.hidden)
        self.blocks = nn.ModuleList(
            _Block(cfg, moe_factory(cfg.hidden, expert_mlp(cfg.hidden, cfg.ffn), cfg.experts, cfg.k))
            for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, 256, bias=False)
        self.l_aux = torch.zeros(())

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def moe_layers(self) -> List[nn.Module]:
        return [b.moe for b in self.blocks]

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        S = tokens_BS.shape[1]
        if S > self.cfg.seq:
            raise ValueError(f"sequence of {S} tokens is longer than the model's seq={self.cfg.seq}")
        x = self.embed(tokens_BS) + self.pos(torch.arange(S, device=tokens_BS.device))
        total = x.new_zeros(())
        for block in self.blocks:
            x, l_aux = block(x)
            total = total + l_aux
        self.l_aux = total
        return self.head(self.norm(x))


class _LocalInner(nn.Module):
    def __init__(self, hidden: int, expert: nn.Module, num_experts: int, k: int) -> None:
        from deepspeed.moe.sharded_moe import TopKGate

        super().__init__()
        self.gate = TopKGate(hidden, num_experts, k, drop_tokens=False, use_rts=False,
                             top2_2nd_expert_sampling=False)
        self.experts = nn.Module()
        self.experts.deepspeed_experts = nn.ModuleList(_copy(expert) for _ in range(num_experts))


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


class LocalMoE(nn.Module):
    """Every expert in this process: DeepSpeed's routing (``gating.route``, dropless) and a direct
    gate-weighted sum over each token's experts. No expert parallelism, no all-to-all.

    ``route_input`` (optional) returns the tensor to route on instead of the layer's input: the
    experts still compute on the true input. ``eval/lm.py`` uses it for predicted routing.

    Returns ``(output, l_aux, exp_counts)`` like ``deepspeed.moe.layer.MoE``.
    """

    def __init__(self, hidden: int, expert: nn.Module, num_experts: int, k: int) -> None:
        super().__init__()
        self.num_experts, self.k = num_experts, k
        self.deepspeed_moe = _LocalInner(hidden, expert, num_experts, k)
        self.route_input: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def forward(self, x: torch.Tensor):
        from .gating import normalized_weight_TK, route

        H = x.shape[-1]
        x_TH = x.reshape(-1, H)
        source_TH = x_TH if self.route_input is None else self.route_input(x).reshape(-1, H)
        routes = route(self.deepspeed_moe.gate, source_TH)
        weight_TK = normalized_weight_TK(routes, self.k)
        out_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x.device)
        for e, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
            tok, slot = (routes.expert_TK == e).nonzero(as_tuple=True)
            if tok.numel():
                out_TH.index_add_(0, tok, expert(x_TH[tok]).float() * weight_TK[tok, slot].unsqueeze(1))
        return out_TH.to(x.dtype).view_as(x), routes.l_aux, routes.exp_counts_E


def _init_experts(model: ByteLM, ep_rank: int, experts_per_rank: int) -> None:
    """Re-draw every local expert from a seed of (seed, layer, global expert id)."""
    for l, moe in enumerate(model.moe_layers()):
        for j, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            g = torch.Generator().manual_seed(model.cfg.seed * 1_000_003 + l * 10_007 + ep_rank * experts_per_rank + j)
            for p in expert.parameters():
                bound = 1.0 / max(1, p.shape[-1]) ** 0.5
                with torch.no_grad():
                    p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)


def build_byte_lm(cfg: ByteLMConfig, ep_size: int = 1, kind: str = "replicated", ep_rank: Optional[int] = None,
                  set_groups: bool = False) -> ByteLM:
    """The model with ``kind`` MoE layers (``"replicated"``, ``"stock"`` or ``"local"``).

    Args:
        cfg: sizes and seed; the same on every rank.
        ep_size: expert-parallel ranks W (``"local"`` holds all experts whatever W is).
        kind: which MoE layer (module docstring).
        ep_rank: this rank's place in its expert-parallel group (default: global rank mod W),
            to pick the seeds of its experts.
        set_groups: create the expert-parallel groups now (``deepspeed.initialize`` does it otherwise).

    Returns:
        The model in training mode; non-expert weights are the same on every rank.
    """
    from deepspeed.moe.layer import MoE

    from .layer import ReplicatedMoE

    if kind not in ("replicated", "stock", "local"):
        raise ValueError(f"kind must be 'replicated', 'stock' or 'local', got {kind!r}")
    W = 1 if kind == "local" else ep_size
    if cfg.experts % W:
        raise ValueError(f"experts ({cfg.experts}) must be divisible by the expert-parallel size ({W})")

    def factory(hidden, expert, num_experts, k):
        common = dict(num_experts=num_experts, ep_size=W, k=k, drop_tokens=False, use_rts=False,
                      top2_2nd_expert_sampling=False)
        if kind == "local":
            return LocalMoE(hidden, expert, num_experts, k)
        return (ReplicatedMoE if kind == "replicated" else MoE)(hidden, expert, **common)

    torch.manual_seed(cfg.seed)
    model = ByteLM(cfg, factory)
    if ep_rank is None:
        ep_rank = (dist.get_rank() % W) if dist.is_initialized() else 0
    _init_experts(model, 0 if kind == "local" else ep_rank, cfg.experts // W)
    if set_groups and kind != "local":
        for layer in model.moe_layers():
            layer.set_deepspeed_parallelism()
    return model


def full_state_dict(model: ByteLM, ep_size: int, group=None) -> Dict[str, torch.Tensor]:
    """Every expert of every layer in one state dict (global expert ids), on every rank.

    Collective over the expert-parallel ``group`` when ``ep_size`` > 1 (all its ranks call it).
    """
    local = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if ep_size == 1:
        return local
    parts: List[Optional[Dict[str, torch.Tensor]]] = [None] * ep_size
    dist.all_gather_object(parts, {k: v for k, v in local.items() if _EXPERT_KEY.match(k)}, group=group)
    per_rank = model.cfg.experts // ep_size
    full = {k: v for k, v in local.items() if not _EXPERT_KEY.match(k)}
    for r, part in enumerate(parts):
        for key, value in part.items():
            head, j, tail = _EXPERT_KEY.match(key).groups()
            full[f"{head}{r * per_rank + int(j)}{tail}"] = value
    return full


def load_full_state_dict(model: ByteLM, full: Dict[str, torch.Tensor], ep_rank: int, ep_size: int) -> None:
    """Load a ``full_state_dict`` into a model holding rank ``ep_rank``'s experts of ``ep_size``
    (``ep_size`` = 1: every expert). Strict: every key of the model must be found."""
    per_rank = model.cfg.experts // ep_size
    mine = {}
    for key, value in full.items():
        m = _EXPERT_KEY.match(key)
        if m is None:
            mine[key] = value
            continue
        e = int(m.group(2))
        if ep_rank * per_rank <= e < (ep_rank + 1) * per_rank:
            mine[f"{m.group(1)}{e - ep_rank * per_rank}{m.group(3)}"] = value
    model.load_state_dict(mine, strict=True)
