"""Shared pieces of the benchmarks, the main job and the tests: twin layers and skewed tokens.

Legend: T tokens, H hidden, F expert FFN size, E logical experts, W expert-parallel ranks.
"""

from __future__ import annotations

import statistics
from typing import Any, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import device_for_rank, init_distributed
from ..layer import ReplicatedMoE

__all__ = ["expert_mlp", "build_pair", "steer", "share_for_hottest", "timed", "median", "all_max", "rank_balance",
           "init_distributed", "device_for_rank"]


def expert_mlp(hidden: int, ffn: int) -> nn.Module:
    """The FFN expert of Switch Transformers: Linear -> activation -> Linear."""
    return nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))


def build_pair(hidden: int = 16, ffn: int = 32, num_experts: int = 4, ep_size: int = 2, k: int = 1,
               replication: Optional[Mapping[str, Any]] = None, seed: int = 0, expert_std: float = 0.5,
               device: Optional[torch.device] = None, set_groups: bool = True,
               **moe_kwargs) -> Tuple[nn.Module, ReplicatedMoE]:
    """A stock ``deepspeed.moe.layer.MoE`` (dropless unless overridden) and a ``ReplicatedMoE``
    holding the same weights, both in eval mode with their expert-parallel groups set (unless
    ``set_groups`` is False: ``deepspeed.initialize`` sets them).

    Experts differ on every rank (each holds its own); the gate is the same everywhere.
    """
    from deepspeed.moe.layer import MoE

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


def timed(fn, group=None) -> Tuple[Any, float]:
    """Run ``fn()`` after a barrier; returns (result, ms), the ms being the slowest rank's."""
    import time

    if dist.is_initialized():
        dist.barrier(group=group)
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    return out, all_max(ms, group)


def all_max(value: float, group=None) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rank_balance(counts_E: torch.Tensor, ep_size: int) -> float:
    """mean / max of the routes each rank's home experts receive (the stock layer's real work)."""
    per_rank = counts_E.reshape(ep_size, -1).sum(dim=1).double()
    return float(per_rank.mean() / per_rank.max()) if per_rank.max() > 0 else 1.0



def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    """A markdown table from a header and rows of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(settings: str, table_md: str, rows: List[Any], json_path: Optional[str]) -> None:
    """On rank 0: print what was compared on which settings, the table, and save the rows as JSON."""
    import json

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    print(f"\n{settings}\n{table_md}", flush=True)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(rows, fh, indent=1)


def add_tiny_switch_args(ap, batch: int = 4, seq: int = 512) -> None:
    """The command-line sizes of the built-in Switch-style model (TinySwitchConfig)."""
    ap.add_argument("--batch", type=int, default=batch, help="sequences per rank per forward")
    ap.add_argument("--seq", type=int, default=seq, help="tokens per sequence")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=4, help="blocks; every other one is an MoE layer")
    ap.add_argument("--experts", type=int, default=8)
