"""Split and plan, timed alone in a tight loop, on the code that ``PYTHONPATH`` points at: the
before/after comparison of ``docs/control_path.md`` (the issue's own measurement, repeated).

    PYTHONPATH=<tree> python launch/control_before_after.py --out FILE.json

Imports ``transport`` from ``ds_moe_replicate.split`` where it exists, else from
``ds_moe_replicate.dispatch`` (before the split had its module), so the same file times both
trees. Inputs: per (E, W), a Zipf-1.2 [W, E] count matrix (4096 routes per rank, seed 0), the
placement ``plan_replicas`` makes for its totals with S = 2; medians over 200 calls (split) and 60
calls (plan) after one warm-up call, each call on the same input (caches hot).
"""

import argparse
import json
import statistics
import time

import numpy as np

try:
    from ds_moe_replicate.split import transport
    TREE = "after"
except ImportError:
    from ds_moe_replicate.dispatch import transport
    TREE = "before"
from ds_moe_replicate.planner import plan_replicas

GRID = [(E, W) for E in (8, 64, 256) for W in (2, 8, 64) if E >= W]


def counts(E, W, rng):
    p = 1.0 / np.arange(1, E + 1) ** 1.2
    p = (p / p.sum())[rng.permutation(E)]
    return np.stack([rng.multinomial(4096, p) for _ in range(W)]).astype(np.int64)


def median_us(fn, n):
    fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for E, W in GRID:
        c = counts(E, W, np.random.default_rng(0))
        load = c.sum(axis=0).astype(float)
        pl = plan_replicas(load, W, 2).placement()
        rows.append(dict(E=E, W=W, split_us=median_us(lambda: transport(c, pl), 200),
                         plan_us=median_us(lambda: plan_replicas(load, W, 2).placement(), 60)))
        print(f"{TREE}: E={E:3d} W={W:2d} split {rows[-1]['split_us']:9.1f} us  plan_replicas "
              f"{rows[-1]['plan_us']:8.1f} us", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(tree=TREE, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
