"""AutoEP benchmark: DeepSpeed's ``stock`` MoE, ``autoep`` (AutoEP as DeepSpeed ships it) and
``autoep+replication`` on a tiny MoE-dominated Mixtral and Qwen3-MoE, uniform and skewed routing.

    deepspeed --num_gpus 2 launch/bench_autoep.py --json docs/bench/autoep_cpu.json

Each mode is a fresh ``deepspeed.initialize`` of the same random model (``stock`` swaps its MoE
blocks for ``deepspeed.moe.layer.MoE`` through ``hf.replace_moe_blocks``); forwards run in eval
under ``torch.no_grad``. ``skewed`` pushes a share of the vocabulary's embeddings toward one
expert's router row (the hot expert); ``uniform`` leaves the random model as it is. Reported per
(model, workload, mode): median ms per forward (slowest rank), AutoEP's balancedness (mean / max
routes per rank under the home placement, from the gathered counts), the replicated run's
balancedness and replicas, the balance limit 1 / AutoEP's balancedness, and the speed-up over
``autoep`` as a fraction of that limit.

Legend: E experts, K routes per token, H hidden, F expert FFN size, W ranks.
"""

from __future__ import annotations

import argparse
import copy
import logging
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..report import markdown_table, report
from ..runtime import init_distributed, median, timed

__all__ = ["build_model", "run", "main"]

logger = logging.getLogger(__name__)

MODES = ("stock", "autoep", "autoep+replication")
FAMILIES = ("mixtral", "qwen3_moe")
WORKLOADS = ("uniform", "skewed")
VOCAB = 512


def build_model(family: str, hidden: int, ffn: int, experts: int, k: int, hot_share: float, seed: int = 0):
    """A one-layer random model whose time is the MoE's (eval, fp32, the same on every rank).

    ``hot_share`` > 0: that share of the vocabulary gets its embedding pushed along expert 0's
    router row, so those tokens route there (the hot expert).
    """
    import transformers as tr

    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=512)
    torch.manual_seed(seed)
    if family == "mixtral":
        model = tr.MixtralForCausalLM(tr.MixtralConfig(**common, intermediate_size=ffn, num_local_experts=experts,
                                                       num_experts_per_tok=k))
    else:
        model = tr.Qwen3MoeForCausalLM(tr.Qwen3MoeConfig(**common, intermediate_size=ffn, moe_intermediate_size=ffn,
                                                         num_experts=experts, num_experts_per_tok=k,
                                                         norm_topk_prob=True))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
                if hot_share > 0:
                    row = p[0] / p[0].norm()
                    emb = model.get_input_embeddings().weight
                    n_hot = int(round(hot_share * VOCAB))
                    emb[:n_hot] += 4.0 * row * emb[:n_hot].norm(dim=1, keepdim=True)
    return model.eval()


def _config(family: str, mode: str, W: int, replication: Dict) -> Dict:
    cfg: Dict = {"train_micro_batch_size_per_gpu": 1}
    if mode != "stock":
        cfg["expert_parallel"] = {"enabled": True, "autoep_size": W, "preset_model": family}
    if mode == "autoep+replication":
        cfg["moe_replication"] = replication
    return cfg


def _engine(model, family: str, mode: str, W: int, replication: Dict):
    import deepspeed

    from ..hf import replace_moe_blocks
    from ..initialize import initialize

    if mode == "stock":
        replace_moe_blocks(model, ep_size=W, mode="stock", set_groups=False)
        engine, *_ = deepspeed.initialize(model=model, config=_config(family, mode, W, replication))
    else:
        engine, *_ = initialize(model=model, config=_config(family, mode, W, replication))
    engine.eval()
    return engine


def _autoep_balancedness(counts_E: np.ndarray, W: int) -> float:
    rank_W = counts_E.reshape(W, -1).sum(axis=1)
    return float(rank_W.mean() / rank_W.max()) if rank_W.max() > 0 else 1.0


def run(family: str, workload: str, args, W: int, rank: int) -> List[Dict]:
    from ..autoep import ReplicatedAutoEPLayer

    replication = {"enabled": True, "slots_per_rank": args.slots, "replan_interval": 4}
    base = build_model(family, args.hidden, args.ffn, args.experts, args.k,
                       args.hot_share if workload == "skewed" else 0.0)
    g = torch.Generator().manual_seed(1234 + rank)
    batches = [torch.randint(0, VOCAB, (args.batch, args.seq), generator=g) for _ in range(args.warmup + args.steps)]
    engines = {mode: _engine(copy.deepcopy(base), family, mode, W, replication) for mode in MODES}
    times: Dict[str, List[float]] = {mode: [] for mode in MODES}
    stats = []
    # NOTE: the modes take turns on each batch, so that load from other processes on shared
    # cores falls on all of them alike.
    with torch.no_grad():
        for i, ids in enumerate(batches):
            for mode, engine in engines.items():
                _, ms = timed(lambda: engine(input_ids=ids))
                if i >= args.warmup:
                    times[mode].append(ms)
            if i >= args.warmup:
                stats.extend(m.last_stats for m in engines["autoep+replication"].module.modules()
                             if isinstance(m, ReplicatedAutoEPLayer))
    rows = [{"model": family, "workload": workload, "mode": mode, "ms_per_forward": median(times[mode])}
            for mode in MODES]
    rows[-1].update(autoep_balancedness=float(np.mean([_autoep_balancedness(s.counts_E.numpy(), W) for s in stats])),
                    balancedness=float(np.mean([s.balancedness for s in stats])),
                    replicas=float(np.mean([s.num_replicas for s in stats])))
    auto = next(r for r in rows if r["mode"] == "autoep")
    rep = next(r for r in rows if r["mode"] == "autoep+replication")
    limit = 1.0 / rep["autoep_balancedness"]
    for r in rows:
        r["speedup_vs_autoep"] = auto["ms_per_forward"] / r["ms_per_forward"]
        r["balance_limit"] = limit
        r["fraction_of_limit"] = r["speedup_vs_autoep"] / limit
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hot_share", type=float, default=0.6)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    init_distributed()
    W, rank = dist.get_world_size(), dist.get_rank()
    rows = [r for fam in args.families for wl in args.workloads for r in run(fam, wl, args, W, rank)]
    table = [[r["model"], r["workload"], r["mode"], f"{r['ms_per_forward']:.1f}",
              f"{r.get('autoep_balancedness', float('nan')):.3f}", f"{r.get('balancedness', float('nan')):.3f}",
              f"{r.get('replicas', float('nan')):.2f}", f"{r['speedup_vs_autoep']:.3f}", f"{r['balance_limit']:.3f}",
              f"{r['fraction_of_limit']:.3f}"] for r in rows]
    settings = (f"AutoEP benchmark: W={W}, E={args.experts}, K={args.k}, H={args.hidden}, F={args.ffn}, "
                f"{args.batch}x{args.seq} tokens per rank, hot share {args.hot_share}, S={args.slots}, "
                f"median of {args.steps} forwards after {args.warmup}")
    report(settings, markdown_table(["model", "workload", "mode", "ms/forward", "AutoEP balancedness",
                                     "balancedness", "replicas", "speed-up vs autoep", "balance limit",
                                     "fraction of limit"], table), rows, args.json)
    return 0
