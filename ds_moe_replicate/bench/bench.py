"""Benchmark over a stack of MoE layers: stock DeepSpeed MoE, ours without replication, a static
plan from history (the EPLB practice), ours with each predictor, and the oracle — side by side.

Run under the ``deepspeed`` launcher (``launch/bench.py``) or ``python -m ds_moe_replicate.bench``
inside a process group. Every mode is its own copy of the same stack (same weights); at each step
all modes see the identical batch, in an order rotated per step, each forward timed after a barrier
as the slowest rank's time; medians are taken after warm-up. Modes:

- ``stock``: ``deepspeed.moe.layer.MoE`` dropless; ``stock_capacity``: the same, capacity factor 1.0;
- ``no_replication``: ``ReplicatedMoE`` with replication on and ``slots_per_rank`` 0;
- ``static_history``: one plan made after warm-up from the mean counts of the first ``--history``
  batches, never changed;
- ``predictive:<name>``: the config's ``moe_replication`` with ``predictor`` = name;
- ``oracle``: predictor ``"oracle"`` (each step's real counts; waits for its copies).

Writes ``bench.json``, ``trace.json`` (the run's routing, ``traces.py`` format), ``balancedness.png``
and ``time.png`` under ``--out``, and prints a markdown table plus the cost model's check: its
predicted speed-ups against the measured ones, with CPU/GPU parameters measured in this run.

Legend: T tokens per rank, H hidden, F FFN, L MoE layers, E experts, W ranks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist

from ..config import ReplicationConfig
from ..gating import capacity_per_expert
from ..layer import configure_replication
from ..planner import home_balancedness, plan_replicas
from ..predictor import NOW, PREDICTORS, EmaPredictor, OraclePredictor, name_of
from ..runtime import all_reduce, collective_device
from .common import device_for_rank, init_distributed, median, timed
from .stack import build_stack
from .traces import Trace, load_trace, save_trace
from .workloads import KINDS, Workload, assign, steer_tokens

ORACLE = name_of(OraclePredictor)  # the oracle mode carries its predictor's name
BASE_MODES = ("stock", "stock_capacity", "no_replication", "static_history", ORACLE)
# The benchmark stack feeds hidden states: every registered predictor but those that need a file
# (they read token ids); the oracle is a mode of its own.
PREDICTOR_MODES = tuple(n for n, c in PREDICTORS.items() if c.source != NOW and not c.needs_file)
NEVER = 10 ** 9  # replan_interval of the static plan: the layer never re-plans on its own


def mode_config(mode: str, base: Dict) -> Dict:
    """The ``moe_replication`` section of a replicated mode."""
    if mode == "no_replication":
        return dict(base, enabled=True, slots_per_rank=0)
    if mode == "static_history":
        return dict(base, enabled=True, predictor=name_of(EmaPredictor), replan_interval=NEVER)
    if mode == ORACLE:
        return dict(base, enabled=True, predictor=name_of(OraclePredictor))
    if mode.startswith("predictive:"):
        return dict(base, enabled=True, predictor=mode.split(":", 1)[1])
    raise ValueError(mode)


def parse_modes(text: str, default_predictor: str) -> List[str]:
    modes = [m.strip() for m in text.replace("<config>", default_predictor).split(",") if m.strip()]
    for m in modes:
        ok = m in BASE_MODES or (m.startswith("predictive:") and m.split(":", 1)[1] in PREDICTOR_MODES)
        if not ok:
            raise ValueError(f"--modes: unknown mode {m!r}; choose from {list(BASE_MODES)} and "
                             f"predictive:<one of {list(PREDICTOR_MODES)}> (the benchmark stack feeds hidden states, "
                             "so 'learned', which reads token ids, is not offered)")
    if len(set(modes)) != len(modes):
        raise ValueError(f"--modes: a mode is listed twice in {modes}")
    return modes


def _install_static_plan(model, history_LE: np.ndarray) -> None:
    """Plan once for ``history_LE`` and wait for its copies (every rank, same step)."""
    for j, layer in enumerate(model.layers):
        inner = layer.deepspeed_moe
        inner.install(inner.policy.plan(history_LE[j], grad=False))


class _StockCounts:
    """Forward hooks on a stock stack: each layer's local ``exp_counts`` of the last forward."""

    def __init__(self, model) -> None:
        self.local: Dict[int, torch.Tensor] = {}
        for j, layer in enumerate(model.layers):
            layer.register_forward_hook(lambda m, i, o, j=j: self.local.__setitem__(j, o[2].detach().cpu()))

    def gathered_LWE(self) -> np.ndarray:
        local = torch.stack([self.local[j] for j in sorted(self.local)]).to(torch.int64)
        local = local.to(collective_device())
        parts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        return torch.stack(parts, dim=1).numpy()


def run_bench(args, base: Dict, modes: List[str], trace: Trace = None) -> Dict:
    W, rank = dist.get_world_size(), dist.get_rank()
    device = device_for_rank()
    L, E = args.layers, args.experts
    wl = Workload(args.workload, L, E, args.zipf, args.correlation, args.drift_every, args.seed,
                  None if trace is None else trace.counts_BLE)
    models, stats, stock_hooks = {}, {}, {}
    for mode in modes:
        kind = mode if mode in ("stock", "stock_capacity") else "replicated"
        model = build_stack(kind, args.hidden, args.ffn, E, L, W, args.k, seed=args.seed).to(device)
        if kind == "replicated":
            configure_replication(model, {"moe_replication": mode_config(mode, base)})
            stats[mode] = []
            for layer in model.layers:
                layer.register_stats_hook(lambda s, m=mode: stats[m].append(s))
        else:
            stock_hooks[mode] = _StockCounts(model)
        models[mode] = model
    dirs = next(iter(models.values())).gate_dirs()
    counter = "stock" if "stock" in models else next(iter(stock_hooks), None)
    times = {m: [] for m in modes}
    bal = {m: [] for m in modes}
    dropped = {m: 0 for m in modes}
    moved = {m: 0 for m in modes}
    waits = {m: [] for m in modes}
    diff = {m: 0.0 for m in modes}
    counts_BLWE, counts_BLE, history = [], [], []
    total = args.warmup + args.steps
    t_start = time.perf_counter()  # progress lines only; forwards are timed by ``timed``
    with torch.no_grad():
        for step in range(total):
            experts_TL = assign(wl.shares(step), args.tokens, args.correlation, seed=args.seed + 7919 * rank + step)
            x = steer_tokens(experts_TL, dirs, args.strength, args.noise, seed=args.seed + 104729 * rank + step)
            x = x.to(device)
            outs, step_ms = {}, {}
            for i in range(len(modes)):
                mode = modes[(i + step) % len(modes)]
                for s in stats.values():
                    s.clear()
                outs[mode], step_ms[mode] = timed(lambda: models[mode](x))
                if mode in stats:
                    st = list(stats[mode])
                    bal[mode].append([s.balancedness for s in st])
                    dropped[mode] += sum(s.dropped_tokens for s in st) if step >= args.warmup else 0
                    moved[mode] += sum(s.bytes_moved for s in st) if step >= args.warmup else 0
                    waits[mode].append(sum(s.exposed_wait_ms for s in st))
                    glob_LE = np.stack([s.counts_E.numpy() for s in st])
                else:
                    lwe = stock_hooks[mode].gathered_LWE()
                    glob_LE = lwe.sum(axis=1)
                    bal[mode].append([home_balancedness(c, W) for c in glob_LE])
                    if mode == "stock_capacity":
                        # The stock capacity layer: capacity factor 1.0, min_capacity 4 (stack.py).
                        cap = int(capacity_per_expert(args.tokens, E, args.k, 1.0, 4))
                        dropped[mode] += int(np.maximum(lwe - cap, 0).sum()) if step >= args.warmup else 0
                    if mode == counter:
                        counts_BLWE.append(lwe)
                if mode == modes[0]:
                    counts_BLE.append(glob_LE)
            for mode in modes:
                if step >= args.warmup:
                    times[mode].append(step_ms[mode])
                if mode != "stock_capacity" and "stock" in outs:
                    d = float((outs[mode] - outs["stock"]).abs().max())
                    diff[mode] = max(diff[mode], d)
            if step < args.history:
                history.append(counts_BLE[-1])
            if step == args.warmup - 1 and "static_history" in models:
                _install_static_plan(models["static_history"], np.mean(history, axis=0))
            if rank == 0 and (step == 0 or (step + 1) % max(1, total // 5) == 0 or step + 1 == total):
                print(f"[bench] step {step + 1}/{total} ({'warm-up' if step < args.warmup else 'timed'}, "
                      f"{time.perf_counter() - t_start:.0f} s): "
                      + ", ".join(f"{m} {step_ms[m]:.0f} ms" for m in modes), flush=True)
    for mode in modes:
        t = all_reduce(torch.tensor([diff[mode]], dtype=torch.float64), dist.ReduceOp.MAX)
        diff[mode] = float(t)
    # Planner time: one re-plan of every layer at once, on this run's counts (outside any forward).
    load_LE = np.mean(counts_BLE, axis=0)
    plan_ms = [timed(lambda: plan_replicas(load_LE, W, base["slots_per_rank"]))[1] for _ in range(10)]
    result_modes = {}
    stock_ms = median(times["stock"]) if "stock" in times else float("nan")
    for mode in modes:
        ms = times[mode]
        per_step = bal[mode][args.warmup:]
        replicated = mode in stats
        result_modes[mode] = dict(
            ms_median=median(ms), ms_p10=float(np.percentile(ms, 10)), ms_p90=float(np.percentile(ms, 90)),
            ms_spread=float(np.percentile(ms, 90) - np.percentile(ms, 10)), ms_all=ms,
            speedup_vs_stock=stock_ms / median(ms),
            balancedness=float(np.mean(per_step)), balancedness_per_layer=np.mean(per_step, axis=0).tolist(),
            balancedness_per_step_layer=per_step, dropped_tokens=int(dropped[mode]),
            bytes_moved=int(moved[mode]), exposed_wait_ms_median=median(waits[mode][args.warmup:]) if replicated
            else 0.0, planner_ms_median=median(plan_ms) if replicated and mode != "no_replication" else 0.0,
            max_abs_diff_vs_stock=diff[mode] if mode != "stock_capacity" else float("nan"),
            replication=mode_config(mode, base) if replicated else None)
    realised = np.stack(counts_BLE)[args.warmup:]
    hottest = float((realised.max(axis=2) / np.maximum(realised.sum(axis=2), 1)).mean())
    return dict(modes=result_modes, counts_BLE=np.stack(counts_BLE), counts_BLWE=np.stack(counts_BLWE)
                if counts_BLWE else None, hottest_share=hottest)


def table(modes: Dict[str, Dict]) -> str:
    lines = ["| mode | ms / forward | p10-p90 ms | speed-up vs stock | balancedness | per layer | dropped tokens | "
             "MB moved | exposed wait ms | max abs diff vs stock |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in modes.items():
        d = m["max_abs_diff_vs_stock"]
        lines.append(f"| {name} | {m['ms_median']:.1f} | {m['ms_p10']:.0f}-{m['ms_p90']:.0f} | "
                     f"{m['speedup_vs_stock']:.2f}x | {m['balancedness']:.3f} | "
                     + " / ".join(f"{b:.2f}" for b in m["balancedness_per_layer"])
                     + f" | {m['dropped_tokens']} | {m['bytes_moved'] / 2 ** 20:.1f} | "
                     f"{m['exposed_wait_ms_median']:.1f} | {'-' if math.isnan(d) else format(d, '.1e')} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON; its moe_replication section is the "
                    "base of every replicated mode (predictor overridden per mode)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", required=True, help="directory for bench.json, trace.json and the plots")
    ap.add_argument("--modes", default="stock,stock_capacity,no_replication,static_history,predictive:<config>,"
                    "predictive:lookahead,oracle", help="comma list; <config> = the config's predictor")
    ap.add_argument("--workload", default="zipf", help=f"one of {list(KINDS)}")
    ap.add_argument("--trace", default=None, help="trace file to replay (--workload trace)")
    ap.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of the expert shares")
    ap.add_argument("--correlation", type=float, default=0.5, help="layer-to-layer routing correlation in [0, 1]")
    ap.add_argument("--drift-every", type=int, default=4, help="batches between hot-expert moves (drift)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank per forward")
    ap.add_argument("-k", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--history", type=int, default=None, help="batches behind static_history's plan "
                    "(default: --warmup)")
    ap.add_argument("--strength", type=float, default=6.0, help="steering strength toward each layer's gate row")
    ap.add_argument("--noise", type=float, default=0.5, help="std of the tokens' random part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-costmodel", action="store_true", help="skip measuring this machine and the model check")
    return ap


def check_args(ap: argparse.ArgumentParser, args) -> None:
    for name in ("layers", "experts", "hidden", "ffn", "tokens", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 1:
        ap.error(f"--warmup must be >= 1 (static_history plans after warm-up), got {args.warmup}")
    args.history = args.warmup if args.history is None else args.history
    if not 1 <= args.history <= args.warmup:
        ap.error(f"--history must lie in [1, --warmup={args.warmup}], got {args.history}")
    if args.workload not in KINDS:
        ap.error(f"--workload: unknown {args.workload!r}; choose from {list(KINDS)}")
    if (args.workload == "trace") != (args.trace is not None):
        ap.error("--trace PATH goes with --workload trace (and only with it)")


def costmodel_check(result: Dict, args, base: Dict) -> Dict:
    """Measure this machine, model every mode on the run's own routing, compare speed-ups.
    Every rank must call it (the all-to-all measurement is collective)."""
    from .calibrate import measure_hardware
    from .costmodel import HARDWARE, MODELS, ModelShape, project, simulate

    device = device_for_rank()
    dtype = torch.float32
    name = f"{device.type}-measured"
    rows = (args.tokens // 2, args.tokens, 2 * args.tokens, 4 * args.tokens)
    hw, raw = measure_hardware(name, args.hidden, args.ffn, rows, dtype,
                               device)
    out = dict(hardware=hw.__dict__, measurements=raw)
    if result["counts_BLWE"] is None:
        out["note"] = "no stock mode ran: per-rank counts unknown, check skipped"
        return out
    W = dist.get_world_size()
    m = ModelShape("bench", args.hidden, args.ffn, args.experts, W, args.tokens, args.k)
    sim = simulate(result["counts_BLWE"], m, hw, base["slots_per_rank"], base["ema_decay"], base["replan_interval"],
                   args.history)
    predicted = {k: float(np.median(v[args.warmup:].sum(axis=1))) for k, v in sim.items()}
    measured = {k: v["ms_median"] for k, v in result["modes"].items()}
    check = {}
    for mode, ms in predicted.items():
        if mode in measured and "stock" in measured:
            p_speed, m_speed = predicted["stock"] / ms, measured["stock"] / measured[mode]
            check[mode] = dict(predicted_ms=ms, measured_ms=measured[mode], predicted_speedup=p_speed,
                               measured_speedup=m_speed, speedup_error=p_speed / m_speed - 1.0)
    out["check"] = check
    out["counts_BLWE"] = result["counts_BLWE"].astype(np.int64).tolist()
    out["projections"] = [dict(project(result["counts_BLE"], MODELS[mn], HARDWARE[hn], 2,
                                       ema_decay=base["ema_decay"], replan_interval=base["replan_interval"],
                                       history=args.history), name=mn)
                          for mn in MODELS for hn in ("H100", "H200")]
    return out


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    cfg = ReplicationConfig.from_ds_config(args.deepspeed_config) if args.deepspeed_config else \
        ReplicationConfig(enabled=True, slots_per_rank=1, replan_interval=4)
    base = dict(cfg.model_dump(), enabled=True)
    try:
        modes = parse_modes(args.modes, cfg.predictor if cfg.predictor in PREDICTOR_MODES else name_of(EmaPredictor))
    except ValueError as err:
        ap.error(str(err))
    trace = None
    if args.trace:
        trace = load_trace(args.trace)
        args.layers, args.experts = trace.num_layers, trace.num_experts
    init_distributed()
    W, rank = dist.get_world_size(), dist.get_rank()
    if args.experts % W:
        ap.error(f"--experts={args.experts} must be divisible by the expert-parallel world size {W}")
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        print(f"[bench] {len(modes)} modes x {args.warmup} warm-up + {args.steps} timed steps; workload "
              f"{args.workload}, W={W}, L={args.layers}, E={args.experts}, H={args.hidden}, F={args.ffn}, "
              f"{args.tokens} tokens/rank", flush=True)
    result = run_bench(args, base, modes, trace)
    check = None if args.no_costmodel else costmodel_check(result, args, base)
    if rank != 0:
        return 0
    from .costmodel import Hardware, assumptions, projection_table

    settings = dict(vars(args), world_size=W, device=device_for_rank().type, modes=modes, moe_replication=base,
                    torch=torch.__version__, hottest_share_mean=result["hottest_share"])
    save_trace(Trace(result["counts_BLE"], args.k, f"bench {args.workload}"), os.path.join(args.out, "trace.json"))
    body = dict(settings=settings, modes=result["modes"], costmodel=check, trace="trace.json")
    with open(os.path.join(args.out, "bench.json"), "w", encoding="utf-8") as fh:
        json.dump(body, fh, indent=1)
    print(f"\nMoE stack benchmark: {len(modes)} modes on identical batches, order rotated per step, "
          f"{args.steps} timed forwards each after {args.warmup} warm-up; slowest rank per forward. "
          f"W={W} ({settings['device']}), L={args.layers} MoE layers, E={args.experts}, H={args.hidden}, "
          f"F={args.ffn}, k={args.k}, {args.tokens} tokens/rank; workload {args.workload} (Zipf {args.zipf}, "
          f"correlation {args.correlation}), hottest expert {result['hottest_share']:.0%} of routes on average; "
          f"moe_replication base {base}")
    print(table(result["modes"]))
    if check and "check" in check:
        print(f"\nCost model vs this run (parameters measured here: {assumptions(Hardware(**check['hardware']))[0]})")
        print("| mode | modelled ms | measured ms | modelled speed-up | measured speed-up | error |\n"
              "|---|---|---|---|---|---|")
        for mode, c in check["check"].items():
            print(f"| {mode} | {c['predicted_ms']:.1f} | {c['measured_ms']:.1f} | {c['predicted_speedup']:.2f}x | "
                  f"{c['measured_speedup']:.2f}x | {c['speedup_error']:+.1%} |")
        print("\nProjections on this run's trace (Switch-base sizes, 2 replica slots per rank):")
        print(projection_table(check["projections"]))
        print("Assumptions: " + check["projections"][0]["assumption"])
    if not args.no_plots:
        from .plots import plot_balancedness, plot_times

        plot_balancedness(result["modes"], os.path.join(args.out, "balancedness.png"))
        plot_times(result["modes"], os.path.join(args.out, "time.png"),
                   f"W={W}, L={args.layers}, E={args.experts}, {args.workload} Zipf {args.zipf}")
    print(f"[bench] wrote {args.out}/bench.json, trace.json" + ("" if args.no_plots else
                                                                ", balancedness.png, time.png"), flush=True)
    return 0
