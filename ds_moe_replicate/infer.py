"""Main job: a small Switch-style model run with stock DeepSpeed MoE layers and with
``ReplicatedMoE``, through ``deepspeed.initialize``, on the same skewed batches, side by side.

    deepspeed --num_gpus 2 launch/infer.py --deepspeed_config configs/demo.json

Modes, all with the same weights: ``stock`` (``deepspeed.moe.layer.MoE``, dropless),
``stock_capacity`` (the stock layer with capacity factor 1.0, which drops tokens) and
``replicated`` (``ReplicatedMoE`` configured from the config's ``"moe_replication"`` section).
For every workload the modes run alternately on identical batches after warm-up; the table gives
the median ms per forward (slowest rank), the balancedness of tokens computed per rank (mean over
MoE layers), tokens dropped, and the largest difference of the model's output from ``stock``.
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List

import torch
import torch.distributed as dist

from .config import ReplicationConfig
from .gating import capacity_per_expert
from .layer import configure_replication
from .planner import home_balancedness
from .report import markdown_table, report
from .runtime import device_for_rank, init_distributed, median, timed
from .tiny_switch import TinySwitch, TinySwitchConfig, add_tiny_switch_args, build_tiny_switch, topic_tokens

MODES = ("stock", "stock_capacity", "ragged", "replicated")
OURS = ("ragged", "replicated")  # ReplicatedMoE without replicas (slots_per_rank 0), and with them


def _engine(model: TinySwitch, ds_config: Dict):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def _dropped(counts_E: torch.Tensor, tokens: int, num_experts: int, k: int) -> int:
    """Routes the stock capacity layer drops on one rank: each expert keeps at most its capacity
    (factor 1.0, min_capacity 4, as ``tiny_switch.build_tiny_switch`` builds it)."""
    capacity = int(capacity_per_expert(tokens, num_experts, k, 1.0, 4))
    return int((counts_E - capacity).clamp_min(0).sum())


def run(args, ds_config: Dict) -> List[Dict]:
    W = dist.get_world_size()
    rank = dist.get_rank()
    device = device_for_rank()
    cfg = TinySwitchConfig(hidden=args.hidden, ffn=args.ffn, blocks=args.blocks, num_experts=args.experts, k=args.k)
    stock_config = {k: v for k, v in ds_config.items() if k != "moe_replication"}
    ragged_config = {**ds_config, "moe_replication": {**ds_config.get("moe_replication", {}), "enabled": True,
                                                       "slots_per_rank": 0}}
    configs = {"stock": stock_config, "stock_capacity": stock_config, "ragged": ragged_config,
               "replicated": ds_config}
    engines = {}
    for mode in MODES:
        model = build_tiny_switch(cfg, W, replicated=mode in OURS, capacity=mode == "stock_capacity",
                                  set_groups=False)
        engines[mode] = _engine(model, configs[mode])
    state = engines["stock"].module.state_dict()
    for mode in MODES[1:]:
        engines[mode].module.load_state_dict(state, strict=True)
    configure_replication(engines["ragged"])
    n_layers = configure_replication(engines["replicated"])
    replication = engines["replicated"].module.moe_layers()[0].replication

    # Per-forward records, filled by hooks (no collectives inside the timed forward).
    seen: Dict[str, list] = {m: [] for m in MODES}
    for mode in ("stock", "stock_capacity"):
        for layer in engines[mode].module.moe_layers():
            layer.register_forward_hook(lambda mod, inp, out, m=mode: seen[m].append(out[2].detach().cpu().clone()))
    for mode in OURS:
        for layer in engines[mode].module.moe_layers():
            layer.register_stats_hook(lambda s, m=mode: seen[m].append(s))

    rows = []
    tokens = args.batch * args.seq
    for share in args.topic_shares:
        name = f"topic {share:.0%}"
        times = {m: [] for m in MODES}
        balance = {m: [] for m in MODES}
        dropped = {m: 0 for m in MODES}
        diff = {m: 0.0 for m in MODES}
        hottest = []
        with torch.no_grad():
            for step in range(args.warmup + args.steps):
                x = topic_tokens(cfg, args.batch, args.seq, share, seed=rank * 104729 + step).to(device)
                out = {}
                order = MODES[step % len(MODES):] + MODES[:step % len(MODES)]
                for mode in order:
                    for v in seen.values():
                        v.clear()
                    out[mode], ms = timed(lambda: engines[mode](x))
                    if step < args.warmup:
                        continue
                    times[mode].append(ms)
                    if mode in OURS:
                        stats = list(seen[mode])
                        balance[mode].append(sum(s.balancedness for s in stats) / len(stats))
                        dropped[mode] += sum(s.dropped_tokens for s in stats)
                        if mode == "replicated":
                            hottest.append(max(float(s.counts_E.max() / max(int(s.counts_E.sum()), 1))
                                               for s in stats))
                    else:
                        local = torch.stack(seen[mode])
                        glob = local.clone().to(device)
                        dist.all_reduce(glob)
                        glob = glob.cpu()
                        balance[mode].append(sum(home_balancedness(c, W) for c in glob) / len(glob))
                        if mode == "stock_capacity":
                            lost = torch.tensor([sum(_dropped(c, tokens, cfg.num_experts, cfg.k) for c in local)],
                                                device=device)
                            dist.all_reduce(lost)
                            dropped[mode] += int(lost)
                if step >= args.warmup:
                    for mode in MODES:
                        diff[mode] = max(diff[mode], float((out[mode] - out["stock"]).abs().max()))
        limit = 1.0 / median(balance["ragged"])
        for mode in MODES:
            t = torch.tensor([diff[mode]], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            vs_ragged = median(times["ragged"]) / median(times[mode])
            rows.append(dict(workload=name, mode=mode, hottest_share=median(hottest), ms=median(times[mode]),
                             speedup=median(times["stock"]) / median(times[mode]), speedup_vs_ragged=vs_ragged,
                             balance_limit=limit, fraction_of_limit=vs_ragged / limit,
                             balancedness=median(balance[mode]), dropped_tokens=dropped[mode], max_abs_diff=float(t),
                             ms_all=times[mode]))
        if rank == 0:
            print(f"[infer] {name}: " + ", ".join(f"{m} {median(times[m]):.1f} ms" for m in MODES), flush=True)
    report(f"Tiny Switch-style model: {cfg.blocks} blocks ({cfg.blocks // 2} MoE), H={cfg.hidden}, F={cfg.ffn}, "
           f"E={cfg.num_experts}, k={cfg.k}, {tokens} tokens/rank, EP={W} on {device.type}; {args.steps} timed "
           f"forwards per mode after {args.warmup} warm-up; {n_layers} ReplicatedMoE layers with "
           f"moe_replication={replication.model_dump()}", table(rows), rows, args.json)
    return rows


def table(rows: List[Dict]) -> str:
    return markdown_table(
        ["workload", "hottest expert (max over layers)", "mode", "ms / forward", "vs stock", "vs ragged",
         "of balance limit", "balancedness", "dropped tokens", "max abs diff vs stock"],
        [[r["workload"], f"{r['hottest_share']:.0%}", r["mode"], f"{r['ms']:.1f}", f"{r['speedup']:.2f}x",
          f"{r['speedup_vs_ragged']:.2f}x", f"{r['fraction_of_limit']:.0%} of {r['balance_limit']:.2f}x"
          if r["mode"] == "replicated" else "", f"{r['balancedness']:.2f}", r["dropped_tokens"],
          f"{r['max_abs_diff']:.1e}"] for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Stock DeepSpeed MoE vs ReplicatedMoE on a small Switch-style model")
    ap.add_argument("--deepspeed_config", default="configs/demo.json", help="DeepSpeed JSON config")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--topic-shares", default="0,0.35,0.7",
                    help="comma-separated shares of topic tokens per batch, one workload each (0 = the model's own "
                         "routing; topic tokens go to one hot expert per MoE layer)")
    add_tiny_switch_args(ap)
    ap.add_argument("-k", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the table's rows here (rank 0)")
    args = ap.parse_args(argv)
    try:
        args.topic_shares = [float(v) for v in args.topic_shares.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--topic-shares: expected comma-separated numbers, got {args.topic_shares!r}")
    if not args.topic_shares or any(not 0.0 <= v <= 1.0 for v in args.topic_shares):
        ap.error(f"--topic-shares: each share must lie in [0, 1], got {args.topic_shares}")
    with open(args.deepspeed_config, encoding="utf-8") as fh:
        ds_config = json.load(fh)
    ReplicationConfig.from_ds_config(ds_config)  # refuse a bad section before starting anything
    init_distributed()
    if args.experts % dist.get_world_size():
        ap.error(f"--experts ({args.experts}) must be divisible by the number of ranks ({dist.get_world_size()})")
    run(args, ds_config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
