"""Layer benchmark: stock DeepSpeed MoE (dropless, padded), our ragged path without replicas, and
ReplicatedMoE, side by side on the same batches.

Run under the ``deepspeed`` launcher (``launch/bench_layer.py``). For each workload the three
layers see identical batches; after warm-up (so the first plan has landed) they take turns, each
forward timed after a barrier as the slowest rank's time, and the medians are compared. Outputs
are compared too. The balance limit is 1 / the ragged path's balancedness: the speed-up over it
that perfectly balanced ranks would give if expert compute were all the time.

Workloads: ``uniform`` (the random gate's own routing), ``hot43`` / ``hot76`` (one expert steered
to 43% / 76% of the routes), and ``trace`` (``--trace FILE``: batch i routes like batch i of one
recorded layer, ``--trace-layer``; each token is drawn from that batch's shares and steered
toward its expert's gate row, as ``launch/bench.py --workload trace`` does for a stack).
"""

from __future__ import annotations

import argparse
import logging
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..planner import home_balancedness
from .common import (
    all_max,
    build_pair,
    device_for_rank,
    init_distributed,
    markdown_table,
    median,
    report,
    share_for_hottest,
    steer,
    timed,
)

log = logging.getLogger(__name__)

WORKLOADS = {"uniform": None, "hot43": 0.43, "hot76": 0.76}


def _trace_batch(shares_E: np.ndarray, tokens: int, gate_w: torch.Tensor, seed: int) -> torch.Tensor:
    """[T, H] tokens whose experts are drawn from ``shares_E`` and steered to their gate rows."""
    from .workloads import steer_tokens

    experts_T1 = np.random.default_rng(seed).choice(shares_E.size, size=(tokens, 1), p=shares_E)
    dirs_1EH = (gate_w.float() / gate_w.float().norm(dim=1, keepdim=True)).unsqueeze(0)
    return steer_tokens(experts_T1, dirs_1EH, strength=6.0, noise=0.5, seed=seed)


def bench_layer(hidden: int, ffn: int, num_experts: int, tokens: int, k: int, workloads: List[str], warmup: int,
                repeats: int, replication: Dict, hot_expert: int = 0, progress: bool = True,
                trace_counts_BE: Optional[np.ndarray] = None) -> List[Dict]:
    """Returns one row per workload: medians, speed-up, balancedness, drops and output difference.

    ``trace_counts_BE`` (int [B, E] routes per expert of one recorded layer) drives ``"trace"``.
    """
    W = dist.get_world_size()
    rank = dist.get_rank()
    device = device_for_rank()
    stock, rep = build_pair(hidden, ffn, num_experts, W, k, replication=replication, expert_std=0.02, device=device)
    _, ragged = build_pair(hidden, ffn, num_experts, W, k, replication={**replication, "slots_per_rank": 0},
                           expert_std=0.02, device=device)
    layers = {"stock": stock, "ragged": ragged, "ours": rep}
    gate_w = stock.deepspeed_moe.gate.wg.weight.detach().cpu()
    rows = []
    for name in workloads:
        if name == "trace":
            shares_BE = trace_counts_BE / np.maximum(trace_counts_BE.sum(axis=1, keepdims=True), 1)
            batches = [_trace_batch(shares_BE[i % len(shares_BE)], tokens, gate_w, seed=rank * 7919 + i).to(device)
                       for i in range(warmup + repeats)]
        else:
            target = WORKLOADS[name]
            share = 0.0 if target is None else share_for_hottest(target, num_experts)
            batches = [steer(tokens, hidden, gate_w, hot_expert, share, seed=rank * 7919 + i).to(device)
                       for i in range(warmup + repeats)]
        modes = list(layers)
        times = {m: [] for m in modes}
        diff, stock_bal, ours_bal, waits, counts = 0.0, [], [], [], None
        with torch.no_grad():
            for i, x in enumerate(batches):
                order = modes[i % 3:] + modes[:i % 3]
                out = {}
                for mode in order:
                    layer = layers[mode]
                    (y, _, c), ms = timed(lambda: layer(x))
                    out[mode] = y
                    if i >= warmup:
                        times[mode].append(ms)
                s = rep.last_stats
                diff = max(diff, float((out["stock"] - out["ours"]).abs().max()),
                           float((out["stock"] - out["ragged"]).abs().max()))
                if i >= warmup:
                    stock_bal.append(home_balancedness(s.counts_E, W))
                    ours_bal.append(s.balancedness)
                    waits.append(s.exposed_wait_ms)
                counts = s.counts_E
        limit = 1.0 / median(stock_bal)
        ragged_ms, ours_ms = median(times["ragged"]), median(times["ours"])
        row = dict(workload=name, hottest_share=float(counts.max() / counts.sum()),
                   stock_ms=median(times["stock"]), ragged_ms=ragged_ms, ours_ms=ours_ms,
                   speedup=median(times["stock"]) / ours_ms, ragged_speedup=median(times["stock"]) / ragged_ms,
                   speedup_vs_ragged=ragged_ms / ours_ms, balance_limit=limit,
                   fraction_of_limit=ragged_ms / ours_ms / limit,
                   stock_balancedness=median(stock_bal), ours_balancedness=median(ours_bal),
                   exposed_wait_ms=median(waits), max_abs_diff=all_max(diff), stock_ms_all=times["stock"],
                   ragged_ms_all=times["ragged"], ours_ms_all=times["ours"])
        rows.append(row)
        if progress and rank == 0:
            log.info("%s: stock %.1f ms, ragged %.1f ms, replicated %.1f ms (%.2fx over ragged, %.0f%% of the "
                     "balance limit %.2fx)", name, row["stock_ms"], ragged_ms, ours_ms, row["speedup_vs_ragged"],
                     100 * row["fraction_of_limit"], limit)
    return rows


def table(rows: List[Dict]) -> str:
    return markdown_table(
        ["workload", "hottest expert share", "stock ms", "ragged ms", "replicated ms", "replicated vs stock",
         "replicated vs ragged", "balance limit", "of limit", "ragged / replicated balancedness", "max abs diff"],
        [[r["workload"], f"{r['hottest_share']:.0%}", f"{r['stock_ms']:.1f}", f"{r['ragged_ms']:.1f}",
          f"{r['ours_ms']:.1f}", f"{r['speedup']:.2f}x", f"{r['speedup_vs_ragged']:.2f}x", f"{r['balance_limit']:.2f}x",
          f"{r['fraction_of_limit']:.0%}", f"{r['stock_balancedness']:.2f} / {r['ours_balancedness']:.2f}",
          f"{r['max_abs_diff']:.1e}"] for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON; its moe_replication section is used")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank per forward")
    ap.add_argument("-k", type=int, default=1)
    ap.add_argument("--workloads", default="uniform,hot43,hot76", help="comma-separated: uniform, hot43, hot76, "
                                                                       "trace (needs --trace)")
    ap.add_argument("--trace", default=None, help="a recorded trace (.json/.pt, traces.py format) for 'trace'; "
                                                  "--experts becomes its E")
    ap.add_argument("--trace-layer", type=int, default=0, help="which recorded layer the 'trace' workload replays")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None, help="write the rows here (rank 0)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from ..config import ReplicationConfig

    init_distributed()
    cfg = ReplicationConfig.from_ds_config(args.deepspeed_config) if args.deepspeed_config else \
        ReplicationConfig(enabled=True, slots_per_rank=1, replan_interval=1)
    if not cfg.enabled:
        raise SystemExit("moe_replication.enabled is false in the config: nothing to compare")
    workloads = [w for w in args.workloads.split(",") if w]
    bad = [w for w in workloads if w not in WORKLOADS and w != "trace"]
    if bad:
        raise SystemExit(f"--workloads: unknown {bad}; choose from {sorted(WORKLOADS) + ['trace']}")
    if ("trace" in workloads) != (args.trace is not None):
        raise SystemExit("--trace FILE goes with the 'trace' workload (and only with it)")
    trace_BE = None
    if args.trace:
        from ..traces import load_trace

        trace = load_trace(args.trace)
        if not 0 <= args.trace_layer < trace.num_layers:
            raise SystemExit(f"--trace-layer must lie in [0, {trace.num_layers - 1}], got {args.trace_layer}")
        trace_BE, args.experts = trace.counts_BLE[:, args.trace_layer], trace.num_experts
    rows = bench_layer(args.hidden, args.ffn, args.experts, args.tokens, args.k, workloads, args.warmup,
                       args.repeats, cfg.model_dump(), trace_counts_BE=trace_BE)
    report(f"stock deepspeed.moe.layer.MoE (dropless, padded) vs our ragged path without replicas vs "
           f"ReplicatedMoE (inference), EP={dist.get_world_size()}, "
           f"E={args.experts}, H={args.hidden}, F={args.ffn}, {args.tokens} tokens/rank, k={args.k}, "
           f"{args.repeats} timed forwards each after {args.warmup} warm-up, "
           f"device={device_for_rank().type}, replication={cfg.model_dump()}", table(rows), rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
