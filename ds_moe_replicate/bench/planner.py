"""Planner benchmark: planned balancedness on Zipf-skewed loads, and re-planning time.

    python -m ds_moe_replicate.bench.planner [--seeds 5] [--json out.json]

For every (Zipf exponent, E, W, S) on the grid it draws expert loads (token counts sampled from a
Zipf distribution over a random expert order) and compares, side by side on the same loads:
no replication (DeepSpeed's placement), an even split of each replicated expert among its copies
(EPLB's sharing rule, on our placement), our planned shares, and the lower bound. Then it times a
re-plan of 24 layers x 256 experts over 64 ranks with S = 2. Last, the incremental re-plan of the
every-step predictors (``replan``) against ``plan_replicas`` on sequences of loads whose hot
experts change every 10 steps: balancedness under the run-time split, time, replicas moved.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import numpy as np
import torch

from ..placement import Placement
from ..planner import balancedness, home_plan, max_rank_load_lower_bound, plan_replicas
from ..replan import replan
from ..runtime import timed
from ..split import quotas

EXPONENTS = (0.8, 1.0, 1.2, 1.4, 1.6)
EXPERTS = (8, 16, 32, 64, 128, 256)
RANKS = (2, 4, 8, 16, 32, 64)
SLOTS = (1, 2)


def zipf_load(num_experts: int, exponent: float, tokens: int, rng: np.random.Generator, layers: int = 1) -> np.ndarray:
    """[layers, E] token counts: Zipf(exponent) popularity over a random expert order, sampled."""
    p = 1.0 / np.arange(1, num_experts + 1) ** exponent
    p /= p.sum()
    out = np.empty((layers, num_experts))
    for layer in range(layers):
        out[layer] = rng.multinomial(tokens, p[rng.permutation(num_experts)])
    return out


def even_split_rank_load(plan, load_LE: np.ndarray) -> np.ndarray:
    """Rank loads if each expert's load were split evenly among the plan's copies (EPLB's rule)."""
    phy = plan.phy2log.numpy()
    cnt = plan.logcnt.numpy()
    L, P = phy.shape
    per_copy = load_LE / cnt
    slot = np.where(phy >= 0, np.take_along_axis(per_copy, np.maximum(phy, 0), axis=1), 0.0)
    return slot.reshape(L, plan.ep_size, -1).sum(axis=2)


def quality(seeds: int, tokens_per_rank: int) -> list[dict]:
    rows = []
    for a, E, W, S in itertools.product(EXPONENTS, EXPERTS, RANKS, SLOTS):
        if E < W or E % W:
            continue
        rng = np.random.default_rng(hash((a, E, W, S)) % 2**32)
        load = zipf_load(E, a, tokens_per_rank * W, rng, layers=seeds)
        plan = plan_replicas(load, W, S)
        ours = plan.balancedness().numpy()
        home = home_plan(load, W).balancedness().numpy()
        even = balancedness(torch.from_numpy(even_split_rank_load(plan, load))).numpy()
        bound = (load.sum(axis=1) / W) / max_rank_load_lower_bound(load, W, S).numpy()
        for i in range(seeds):
            rows.append(dict(exponent=a, E=E, W=W, S=S, ours=float(ours[i]), none=float(home[i]),
                             even=float(even[i]), bound=float(bound[i])))
    return rows


def replan_ms(layers: int = 24, experts: int = 256, ranks: int = 64, slots: int = 2, repeats: int = 20) -> list[float]:
    rng = np.random.default_rng(0)
    load = torch.from_numpy(zipf_load(experts, 1.2, 4096 * ranks, rng, layers=layers))
    plan_replicas(load, ranks, slots)  # warm-up
    return [timed(lambda: plan_replicas(load, ranks, slots))[1] for _ in range(repeats)]


def _split_balancedness(tokens_E: np.ndarray, placement: Placement) -> float:
    rank_W = quotas(tokens_E[None].astype(np.int64), placement).reshape(placement.ep_size, -1).sum(axis=1)
    return float(rank_W.mean() / rank_W.max()) if rank_W.max() > 0 else 1.0


def incremental(steps: int = 40, tokens_per_rank: int = 4096) -> list[dict]:
    """``replan`` from the previous step's placement vs ``plan_replicas`` from scratch, per step."""
    rows = []
    for E, W, S in itertools.product((64, 256), (8, 64), (1, 2)):
        rng = np.random.default_rng(E * 1000 + W * 10 + S)
        p = 1.0 / np.arange(1, E + 1) ** 1.2
        p /= p.sum()
        prev_inc = prev_full = Placement.home(E, W, S)
        for step in range(steps):
            if step % 10 == 0:
                perm = rng.permutation(E)
            load = rng.multinomial(tokens_per_rank * W, p[perm]).astype(float)
            inc, t_inc = timed(lambda: replan(load, prev_inc))
            full, t_full = timed(lambda: plan_replicas(load, W, S).placement(version=prev_full.version + 1))
            t_inc, t_full = t_inc * 1e3, t_full * 1e3  # microseconds
            moved = [int(((new.phy2log_P != old.phy2log_P) & (new.phy2log_P >= 0)).sum())
                     for new, old in ((inc, prev_inc), (full, prev_full))]
            rows.append(dict(E=E, W=W, S=S, step=step, replan=_split_balancedness(load, inc),
                             full=_split_balancedness(load, full), home=_split_balancedness(load, Placement.home(E, W, S)),
                             replan_us=t_inc, full_us=t_full, replan_moved=moved[0], full_moved=moved[1]))
            prev_inc, prev_full = inc, full
    return rows


def summarize_incremental(rows: list[dict]) -> str:
    lines = ["| E | W | S | replan: balancedness (median / min) | plan_replicas: balancedness (median / min) | "
             "replan µs (median) | plan_replicas µs (median) | replicas moved per step (replan / full) |",
             "|---|---|---|---|---|---|---|---|"]
    for E, W, S in itertools.product((64, 256), (8, 64), (1, 2)):
        sel = [r for r in rows if (r["E"], r["W"], r["S"]) == (E, W, S)]
        med = lambda k: statistics.median(r[k] for r in sel)  # noqa: E731
        lines.append(f"| {E} | {W} | {S} | {med('replan'):.4f} / {min(r['replan'] for r in sel):.4f} | "
                     f"{med('full'):.4f} / {min(r['full'] for r in sel):.4f} | {med('replan_us'):.0f} | "
                     f"{med('full_us'):.0f} | {np.mean([r['replan_moved'] for r in sel]):.1f} / "
                     f"{np.mean([r['full_moved'] for r in sel]):.1f} |")
    return "\n".join(lines)


def summarize(rows: list[dict]) -> str:
    lines = ["| S | exponent | plans | none (median) | even split (median) | ours (median) | ours (min) | bound (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for S, a in itertools.product(SLOTS, EXPONENTS):
        sel = [r for r in rows if r["S"] == S and r["exponent"] == a]
        med = lambda k: statistics.median(r[k] for r in sel)  # noqa: E731
        lines.append(f"| {S} | {a} | {len(sel)} | {med('none'):.3f} | {med('even'):.3f} | {med('ours'):.3f} | "
                     f"{min(r['ours'] for r in sel):.3f} | {med('bound'):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="random load draws per grid point")
    ap.add_argument("--tokens-per-rank", type=int, default=4096)
    ap.add_argument("--json", default=None, help="write every plan's figures here")
    args = ap.parse_args(argv)

    rows = quality(args.seeds, args.tokens_per_rank)
    worse = sum(r["ours"] < r["none"] - 1e-12 for r in rows)
    print(f"Planned balancedness (mean/max rank load), Zipf loads, E in {EXPERTS}, W in {RANKS} (E >= W), "
          f"{args.seeds} draws each, {args.tokens_per_rank} tokens per rank")
    print(summarize(rows))
    for S in SLOTS:
        sel = [r["ours"] for r in rows if r["S"] == S]
        print(f"S={S}: median ours {statistics.median(sel):.4f} over {len(sel)} plans, min {min(sel):.4f}")
    print(f"plans worse than no replication: {worse} of {len(rows)}")
    times = replan_ms()
    print(f"re-plan 24 layers x 256 experts over 64 ranks, S=2: median {statistics.median(times):.2f} ms, "
          f"max {max(times):.2f} ms over {len(times)} runs")
    inc = incremental()
    worse_inc = sum(r["replan"] < r["home"] - 1e-12 for r in inc)
    print("Incremental re-plan (every-step predictors), Zipf-1.2 loads whose hot experts change every 10 steps, "
          "balancedness under the run-time split (split.quotas):")
    print(summarize_incremental(inc))
    print(f"re-plans worse than no replication: {worse_inc} of {len(inc)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, replan_ms=times, incremental=inc), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
