"""Training benchmark: forward + backward + optimizer step of stock DeepSpeed ``MoE`` dropless
(padded), our ragged path without replicas, and replicated training with each history/now
predictor, side by side on identical batches.

Run under the ``deepspeed`` launcher (``launch/bench_train.py``). Every mode is its own
``deepspeed.initialize`` engine (Adam) built from the same weights; for each workload the modes
take turns step by step (so they share the machine's noise), each step timed after a barrier as
the slowest rank's time. Losses are compared too: replication must not change any of them.

The balance limit of a workload is 1 / (balancedness of the ragged path): the speed-up over the
ragged path that perfectly balanced ranks would give if expert compute were all the time.

Legend: T tokens per rank, H hidden, F expert FFN size, E experts, W ranks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

from ..config import ReplicationConfig
from ..planner import balancedness
from ..runtime import device_for_rank, init_distributed, median, timed
from ..testing import build_pair, share_for_hottest, steer
from .common import markdown_table, report

log = logging.getLogger(__name__)

WORKLOADS = {"uniform": None, "hot43": 0.43, "hot76": 0.76}


class _Net(nn.Module):
    """The MoE layer and a regression loss on its output (the step is the layer's)."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, l_aux, _ = self.moe(x)
        return ((h - y) ** 2).mean() + 0.01 * l_aux


def _engine(moe: nn.Module, ds_config: Dict):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from ..layer import configure_replication

    net = _Net(moe)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(net.parameters()), "name": "p"})
    engine, *_ = deepspeed.initialize(model=net, model_parameters=groups, config=ds_config)
    configure_replication(engine)
    return engine


def modes_for(predictors: List[str]) -> List[str]:
    return ["stock", "ragged"] + [f"replicated:{p}" for p in predictors]


def bench_train(args, base_config: Dict, replication: ReplicationConfig) -> List[Dict]:
    """One row per workload: per mode the median step time, balancedness, replicas and bytes."""
    W, rank = dist.get_world_size(), dist.get_rank()
    device = device_for_rank()
    predictors = [p for p in args.predictors.split(",") if p]
    modes = modes_for(predictors)
    rows = []
    for name in args.workloads.split(","):
        engines, layers = {}, {}
        for mode in modes:
            stock, rep = build_pair(args.hidden, args.ffn, args.experts, W, args.k, expert_std=0.02, set_groups=False,
                                    device=device)
            moe = stock if mode == "stock" else rep
            if mode == "stock":
                section = {"enabled": False}
            elif mode == "ragged":
                section = {**replication.model_dump(), "enabled": True, "slots_per_rank": 0}
            else:
                section = {**replication.model_dump(), "enabled": True, "predictor": mode.split(":", 1)[1]}
            engines[mode] = _engine(moe, {**base_config, "moe_replication": section})
            layers[mode] = moe
        gate_w = layers["stock"].deepspeed_moe.gate.wg.weight.detach().float().cpu()
        target = WORKLOADS[name]
        share = 0.0 if target is None else share_for_hottest(target, args.experts)
        steps = args.warmup + args.repeats
        batches = []
        for i in range(steps):
            x = steer(args.tokens, args.hidden, gate_w, 0, share, seed=rank * 7919 + i).to(device)
            batches.append((x, torch.tanh(x)))
        times = {m: [] for m in modes}
        losses = {m: [] for m in modes}
        stats = {m: [] for m in modes}
        for i, (x, y) in enumerate(batches):
            order = modes[i % len(modes):] + modes[:i % len(modes)]
            for mode in order:
                engine = engines[mode]

                def step():
                    loss = engine(x, y)
                    engine.backward(loss)
                    engine.step()
                    return loss

                loss, ms = timed(step)
                losses[mode].append(float(loss))
                if i >= args.warmup:
                    times[mode].append(ms)
                    s = getattr(layers[mode], "last_stats", None)
                    if s is not None:
                        stats[mode].append(s)
            if rank == 0:
                log.info("%s step %d/%d: %s", name, i + 1, steps,
                         ", ".join(f"{m} {times[m][-1]:.0f} ms" for m in modes if times[m]))
        ragged_bal = median([s.balancedness for s in stats["ragged"]])
        stock_counts = [s.counts_E for s in stats["ragged"]]
        row = {"workload": name, "hottest_share": float(sum(c.max() for c in stock_counts) /
                                                         max(1, sum(c.sum() for c in stock_counts))),
               "balance_limit": 1.0 / ragged_bal, "modes": {}}
        for mode in modes:
            ss = stats[mode]
            bal = (median([s.balancedness for s in ss]) if ss else
                   median([float(balancedness(c.reshape(W, -1).sum(dim=1))) for c in stock_counts]))
            rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses["stock"], losses[mode]))
            row["modes"][mode] = {
                "ms_median": median(times[mode]), "ms_all": times[mode], "balancedness": bal,
                "replicas": median([s.num_replicas for s in ss]) if ss else 0,
                "bytes_moved_per_step": median([s.bytes_moved for s in ss]) if ss else 0,
                "exposed_wait_ms": median([s.exposed_wait_ms for s in ss]) if ss else 0.0,
                "max_rel_loss_diff_vs_stock": rel,
            }
        ragged_ms = row["modes"]["ragged"]["ms_median"]
        for m in row["modes"].values():
            m["speedup_vs_stock"] = row["modes"]["stock"]["ms_median"] / m["ms_median"]
            m["speedup_vs_ragged"] = ragged_ms / m["ms_median"]
            m["fraction_of_balance_limit"] = m["speedup_vs_ragged"] / row["balance_limit"]
        rows.append(row)
        if rank == 0:
            log.info("%s: %s", name, ", ".join(f"{m} {v['ms_median']:.0f} ms" for m, v in row["modes"].items()))
    return rows


def table(rows: List[Dict]) -> str:
    out = []
    for r in rows:
        for mode, m in r["modes"].items():
            out.append([r["workload"], f"{r['hottest_share']:.0%}", mode, f"{m['ms_median']:.1f}",
                        f"{m['speedup_vs_stock']:.2f}x", f"{m['speedup_vs_ragged']:.2f}x",
                        f"{r['balance_limit']:.2f}x", f"{m['fraction_of_balance_limit']:.0%}",
                        f"{m['balancedness']:.2f}", f"{m['replicas']:.0f}", f"{m['bytes_moved_per_step'] / 1e6:.1f}",
                        f"{m['exposed_wait_ms']:.1f}", f"{m['max_rel_loss_diff_vs_stock']:.1e}"])
    return markdown_table(["workload", "hottest", "mode", "step ms", "vs stock", "vs ragged", "balance limit",
                           "of limit", "balancedness", "replicas", "MB moved/step", "exposed wait ms",
                           "loss rel diff"], out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (optimizer, precision, ZeRO, "
                    "moe_replication)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="folder for train_bench.json (rank 0)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank per step (the layer benchmark's size)")
    ap.add_argument("-k", type=int, default=1)
    ap.add_argument("--workloads", default="uniform,hot43,hot76")
    ap.add_argument("--predictors", default="ema,oracle", help="replicated modes to run (history or now predictors)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for w in args.workloads.split(","):
        if w not in WORKLOADS:
            raise SystemExit(f"--workloads: unknown {w!r}; choose from {sorted(WORKLOADS)}")
    with open(args.deepspeed_config, encoding="utf-8") as fh:
        base = json.load(fh)
    replication = ReplicationConfig.from_ds_config(base)
    base = {k: v for k, v in base.items() if k != "moe_replication"}
    init_distributed()
    rows = bench_train(args, base, replication)
    settings = (f"Training step (forward + backward + Adam step) per mode, EP={dist.get_world_size()}, "
                f"E={args.experts}, H={args.hidden}, F={args.ffn}, {args.tokens} tokens/rank, k={args.k}, "
                f"{args.repeats} timed steps after {args.warmup} warm-up, device={device_for_rank().type}; "
                "balance limit = 1 / balancedness of the ragged path")
    path = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "train_bench.json")
    report(settings, table(rows), {"settings": {**vars(args), "replication": replication.model_dump()},
                                   "rows": rows}, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
