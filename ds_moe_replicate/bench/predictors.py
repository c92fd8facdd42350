"""Predictor benchmark: which predictor keeps replicas where the tokens go, and what it costs.

Run under the ``deepspeed`` launcher (``launch/bench_predictors.py``). The same tiny Switch-style
model (same weights) is built once per mode: ``stock`` (DeepSpeed's MoE, dropless), ``ragged``
(``ReplicatedMoE`` with ``slots_per_rank: 0``: the ragged all-to-all, no replica) and
``ReplicatedMoE`` with each predictor. For each workload every mode sees identical batches,
round-robin after warm-up; reported per mode: median ms per forward (slowest rank), the speed-up
over ``ragged`` and the fraction of the balance limit it reached (1 / the ragged path's
balancedness), realised balancedness of tokens computed per rank (mean over MoE layers and steps)
beside what the oracle plan would have reached on the same counts, the prediction's L1 error and
hot-expert recall, the exposed wait for replica weights as a share of step time, and the largest
output difference from ``stock``.

Workloads: ``switching`` (the hot topic alternates every batch) and ``steady`` (one topic).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist

from ..config import ReplicationConfig
from ..layer import configure_replication
from ..planner import plan_replicas
from ..predictor import PREDICTORS
from ..tiny_switch import TinySwitchConfig, build_tiny_switch, topic_tokens
from ..train_predictor import distill
from .common import add_tiny_switch_args, device_for_rank, init_distributed, markdown_table, median, report, timed

WORKLOADS = ("switching", "steady")


def _oracle_balance(counts_E: torch.Tensor, ep_size: int, slots: int) -> float:
    return float(plan_replicas(counts_E.double(), ep_size, slots).balancedness()[0])


def run_workload(workload: str, cfg: TinySwitchConfig, base: Dict, predictors: List[str], batch: int, seq: int,
                 share: float, warmup: int, steps: int, device) -> List[Dict]:
    W, rank = dist.get_world_size(), dist.get_rank()
    models = {"stock": build_tiny_switch(cfg, W, replicated=False).to(device)}
    state = models["stock"].state_dict()
    records: Dict[str, list] = {}
    learned_path = None
    if any(PREDICTORS[name].needs_file for name in predictors):
        # Distil the learned predictor from this model's routers (on other batches than the timed ones).
        box = [os.path.join(tempfile.gettempdir(), f"ds_moe_learned_{os.getpid()}.pt")]
        dist.broadcast_object_list(box, src=0)
        learned_path = box[0]
        distill(models["stock"], cfg, learned_path, batches=4, batch=batch, seq=seq, topic_share=share, device=device)
    sections = {"ragged": dict(base, slots_per_rank=0)}
    sections.update({name: dict(base, predictor=name, learned_path=learned_path) for name in predictors})
    for name, section in sections.items():
        model = build_tiny_switch(cfg, W, replicated=True).to(device)
        model.load_state_dict(state, strict=True)
        configure_replication(model, {"moe_replication": section})
        records[name] = []
        for layer in model.moe_layers():
            layer.register_stats_hook(lambda s, n=name: records[n].append(s))
        models[name] = model
    modes = list(models)
    times = {m: [] for m in modes}
    diff = {m: 0.0 for m in modes}
    kept: Dict[str, list] = {m: [] for m in records}
    with torch.no_grad():
        for step in range(warmup + steps):
            topic = step % cfg.topics if workload == "switching" else 0
            x = topic_tokens(cfg, batch, seq, share, seed=rank * 7717 + step, topic=topic).to(device)
            outs = {}
            for i in range(len(modes)):
                mode = modes[(i + step) % len(modes)]
                for r in records.values():
                    r.clear()
                outs[mode], ms = timed(lambda: models[mode](x))
                if step >= warmup:
                    times[mode].append(ms)
                    if mode in records:
                        kept[mode].append((ms, list(records[mode])))
            if step >= warmup:
                for mode in modes:
                    diff[mode] = max(diff[mode], float((outs[mode] - outs["stock"]).abs().max()))
    rows = []
    for mode in modes:
        t = torch.tensor([diff[mode]], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        row = dict(workload=workload, mode=mode, ms=median(times[mode]), max_abs_diff=float(t), ms_all=times[mode])
        if mode in kept:
            stats = [s for _, step_stats in kept[mode] for s in step_stats]
            wait_share = [sum(s.exposed_wait_ms for s in st) / ms for ms, st in kept[mode]]
            row.update(
                balancedness=float(np.mean([s.balancedness for s in stats])),
                oracle_balancedness=float(np.mean([_oracle_balance(s.counts_E, W, base["slots_per_rank"])
                                                   for s in stats])),
                per_layer_balancedness=[float(np.mean([s.balancedness for s in stats[j::len(kept[mode][0][1])]]))
                                        for j in range(len(kept[mode][0][1]))],
                prediction_l1=float(np.nanmean([s.prediction_l1 for s in stats])),
                hot_recall=float(np.nanmean([s.hot_recall for s in stats])),
                exposed_wait_share=float(np.median(wait_share)),
                late_steps=int(sum(s.prefetch_late for s in stats)),
                bytes_moved=int(sum(s.bytes_moved for s in stats)),
            )
        else:
            row.update(balancedness=float("nan"), oracle_balancedness=float("nan"), per_layer_balancedness=[],
                       prediction_l1=float("nan"), hot_recall=float("nan"), exposed_wait_share=0.0, late_steps=0,
                       bytes_moved=0)
        rows.append(row)
    ragged = next(r for r in rows if r["mode"] == "ragged")
    limit = 1.0 / ragged["balancedness"] if ragged["balancedness"] > 0 else float("nan")
    for row in rows:
        row.update(vs_ragged=ragged["ms"] / row["ms"], balance_limit=limit,
                   fraction_of_limit=ragged["ms"] / row["ms"] / limit)
    return rows


def table(rows: List[Dict]) -> str:
    def f(v, fmt):
        return "-" if isinstance(v, float) and math.isnan(v) else format(v, fmt)

    return markdown_table(
        ["workload", "mode", "ms / forward", "vs ragged", "of limit (limit)", "balancedness", "oracle plan's",
         "per layer", "L1 error", "hot recall", "exposed wait", "late steps", "max abs diff"],
        [[r["workload"], r["mode"], f"{r['ms']:.1f}", f"{r['vs_ragged']:.2f}x",
          f"{r['fraction_of_limit']:.0%} ({r['balance_limit']:.2f}x)", f(r["balancedness"], ".3f"),
          f(r["oracle_balancedness"], ".3f"),
          " / ".join(f"{b:.2f}" for b in r["per_layer_balancedness"]) or "-", f(r["prediction_l1"], ".3f"),
          f(r["hot_recall"], ".2f"), f"{r['exposed_wait_share']:.1%}", r["late_steps"], f"{r['max_abs_diff']:.1e}"]
         for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deepspeed_config", default=None,
                    help="DeepSpeed JSON whose moe_replication section is the base (predictor is overridden)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--predictors", default=",".join(PREDICTORS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--topic-share", type=float, default=0.7, help="share of topic tokens per batch")
    add_tiny_switch_args(ap)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    predictors = [p for p in args.predictors.split(",") if p]
    workloads = [w for w in args.workloads.split(",") if w]
    for given, allowed, flag in ((predictors, PREDICTORS, "--predictors"), (workloads, WORKLOADS, "--workloads")):
        bad = [v for v in given if v not in allowed]
        if bad:
            ap.error(f"{flag}: unknown {bad}; choose from {list(allowed)}")
    base = ReplicationConfig.from_ds_config(args.deepspeed_config) if args.deepspeed_config else \
        ReplicationConfig(enabled=True, slots_per_rank=1, replan_interval=1)
    base = dict(base.model_dump(), enabled=True)
    init_distributed()
    device = device_for_rank()
    cfg = TinySwitchConfig(hidden=args.hidden, ffn=args.ffn, blocks=args.blocks, num_experts=args.experts)
    rows = []
    for w in workloads:
        rows += run_workload(w, cfg, base, predictors, args.batch, args.seq, args.topic_share, args.warmup,
                             args.steps, device)
        if dist.get_rank() == 0:
            print(f"[bench] {w} done", flush=True)
    report(f"Predictors on a tiny Switch-style model: {cfg.blocks // 2} MoE layers, E={cfg.num_experts}, "
           f"H={cfg.hidden}, F={cfg.ffn}, {args.batch * args.seq} tokens/rank, EP={dist.get_world_size()}, "
           f"topic share {args.topic_share:.0%}; {args.steps} timed forwards per mode after {args.warmup} "
           f"warm-up, modes round-robin on identical batches; base moe_replication={base}", table(rows), rows,
           args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
