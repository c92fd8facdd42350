"""Per-step training losses of two or more ``launch/train.py`` runs, compared pair by pair.

    python launch/compare_losses.py /tmp/run_stock /tmp/run_replicated /tmp/run_noslots \
        --names stock replicated noslots --json /tmp/compare.json

Each run is a folder holding ``summary.json`` (or the file itself); its ``history`` gives the loss
of every step. For every pair (A, B) in the order given, the relative difference at step s is
``|loss_B[s] - loss_A[s]| / |loss_A[s]|``. Printed per pair: the first step whose losses differ at
all, the first step above ``--threshold``, the largest difference, and the difference at each of
``--steps``. When both folders hold ``trace_train.json`` (routes per expert of every MoE layer at
every step, summed over the ranks), also the first step at which the two runs routed differently,
and the largest loss difference before it. Steps are 0-based, as in ``history``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Dict, List, Optional


def load_losses(path: str) -> List[float]:
    if os.path.isdir(path):
        path = os.path.join(path, "summary.json")
    with open(path, encoding="utf-8") as fh:
        summary = json.load(fh)
    history = summary.get("history")
    if not history:
        raise SystemExit(f"{path}: no per-step 'history' in summary.json")
    if [h["step"] for h in history] != list(range(len(history))):
        raise SystemExit(f"{path}: history steps are not 0, 1, 2, ...")
    return [float(h["loss"]) for h in history]


def load_routing(path: str) -> Optional[list]:
    """Routes per expert [step][layer][expert] of a run folder's ``trace_train.json``, or None."""
    trace = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "trace_train.json")
    if not os.path.exists(trace):
        return None
    with open(trace, encoding="utf-8") as fh:
        return json.load(fh)["counts"]


def compare(a: List[float], b: List[float], steps: List[int], threshold: float, routes_a=None, routes_b=None) -> Dict:
    n = min(len(a), len(b))
    rel = [abs(b[i] - a[i]) / abs(a[i]) if a[i] != 0.0 else (0.0 if b[i] == 0.0 else float("inf")) for i in range(n)]
    first_diff: Optional[int] = next((i for i in range(n) if a[i] != b[i]), None)
    first_above: Optional[int] = next((i for i in range(n) if rel[i] > threshold), None)
    out = dict(steps_compared=n, identical=first_diff is None, first_differing_step=first_diff,
               first_step_above_threshold=first_above, max_rel_diff=max(rel) if rel else 0.0,
               max_rel_diff_step=max(range(n), key=rel.__getitem__) if rel else None,
               at_steps={str(s): rel[s] for s in steps if s < n})
    if routes_a is not None and routes_b is not None:
        m = min(n, len(routes_a), len(routes_b))
        flip = next((i for i in range(m) if routes_a[i] != routes_b[i]), None)
        out.update(first_routing_difference_step=flip,
                   max_rel_diff_before_routing_difference=max(rel[:flip if flip is not None else m], default=0.0))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders (or their summary.json), two or more")
    ap.add_argument("--names", nargs="+", default=None, help="a label per run (default: the folder names)")
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 50, 100, 200, 399],
                    help="0-based steps at which to print the relative difference")
    ap.add_argument("--threshold", type=float, default=1e-5, help="relative difference reported as first exceeded")
    ap.add_argument("--json", default=None, help="also write the comparison here")
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        ap.error("give two or more runs")
    names = args.names or [os.path.basename(os.path.normpath(
        os.path.dirname(r) if r.endswith(".json") else r)) for r in args.runs]
    if len(names) != len(args.runs):
        ap.error(f"{len(args.runs)} runs but {len(names)} --names")
    losses = {name: load_losses(path) for name, path in zip(names, args.runs)}
    routing = {name: load_routing(path) for name, path in zip(names, args.runs)}

    pairs = []
    for x, y in itertools.combinations(names, 2):
        pairs.append(dict(a=x, b=y, **compare(losses[x], losses[y], args.steps, args.threshold, routing[x], routing[y])))

    def fmt(v) -> str:
        return "-" if v is None else f"{v:.1e}"

    head = ["A", "B", "steps", "first differing step", f"first step > {args.threshold:g}", "max (step)"]
    head += [f"step {s}" for s in args.steps] + ["first routing difference (max diff before)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for p in pairs:
        row = [p["a"], p["b"], str(p["steps_compared"]),
               "none (identical)" if p["identical"] else str(p["first_differing_step"]),
               "none" if p["first_step_above_threshold"] is None else str(p["first_step_above_threshold"]),
               f"{p['max_rel_diff']:.1e} ({p['max_rel_diff_step']})"]
        row += [fmt(p["at_steps"].get(str(s))) for s in args.steps]
        if "first_routing_difference_step" not in p:
            row.append("- (no traces)")
        else:
            flip = p["first_routing_difference_step"]
            row.append(f"{'none' if flip is None else flip} ({p['max_rel_diff_before_routing_difference']:.1e})")
        print("| " + " | ".join(row) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(dict(runs=dict(zip(names, args.runs)), threshold=args.threshold, steps=args.steps, pairs=pairs),
                      fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
