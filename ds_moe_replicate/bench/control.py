"""Control-path benchmark: per layer per step, everything that is not expert compute or all-to-all.

    python -m ds_moe_replicate.bench.control [--out FILE.json] [--steps 60]

Emulated on one process: for each (E, W) every step draws a gathered ``[W, E]`` count matrix
(Zipf-1.2 popularity over a random expert order, 4096 routes per rank, k = 1; the hot experts
change every 20 steps) and runs the layer's own control code on it, S = 2 replica slots per rank:

- count: this rank's ``torch.bincount`` of its routes, then ``comm.gather_step`` (the real
  function; its collective is replaced by a copy of the other ranks' rows, so what is timed is the
  bookkeeping around it: payload, numpy view, status check, slicing) and the global sum;
- split: ``split.transport`` on the active placement;
- plan: the planner where it runs. History predictors (``ema``, ``window``) re-plan every
  ``replan_interval`` steps with ``plan_replicas``, after the step's dispatch was started, so
  off the critical path; ``lookahead`` / ``oracle`` plan every step before their split. Both
  are timed: ``plan_replicas`` (what the controller calls today) and ``replan`` (incremental);
- stats: rank tokens, balancedness, dropped tokens and ``layer.prediction_quality``.

Two step loops per (E, W), medians over the steps:

- history (EMA predictor, ``replan_interval`` = 4): count + split + stats per step
  (``total_history_us``); its plan is reported per call and amortised per step, not added.
- every step (an oracle that plans for the step's own counts, from its previous placement):
  count + plan + split + stats (``total_us``, with ``replan``; ``total_full_plan_us`` with
  ``plan_replicas``, as the controller does today). The split then often runs on a placement it
  has not seen (its per-placement indices are built in that call).

Legend: E logical experts, W ranks, S replica slots per rank, T routes per rank.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace
from typing import Dict, List
from unittest import mock

import numpy as np
import torch

from .. import comm
from ..config import ReplicationConfig
from ..hooks import step_stats
from ..placement import Placement, plan_transfers
from ..planner import plan_replicas
from ..policy import ReplicationPolicy
from ..split import transport

__all__ = ["GRID", "measure", "main"]

GRID = [(E, W) for E in (8, 64, 256) for W in (2, 8, 64) if E >= W]
SLOTS = 2
TOKENS = 4096
REPLAN_INTERVAL = 4
SWITCH_EVERY = 20

DEFINITIONS = {
    "count_us": "this rank's bincount of its routes + comm.gather_step bookkeeping (collective replaced by a copy) "
                "+ global sum",
    "split_us": "split.transport per step, history loop (placement changes every replan_interval steps)",
    "split_every_step_us": "split.transport per step, every-step loop (placement from replan, often new)",
    "plan_us": "ReplicationPolicy.decide of the oracle per step (replan from the active placement, the cost "
               "check, activation, plan_transfers): every-step predictors, on the critical path",
    "plan_full_us": "plan_replicas from scratch + placement + plan_transfers per call, every-step loop (for comparison)",
    "plan_history_us": "ReplicationPolicy.close at a re-plan (plan_replicas + cost check) + plan_transfers, "
                       "history loop (after the step's experts ran)",
    "plan_history_amortised_us": "plan_history_us / replan_interval",
    "stats_us": "hooks.step_stats: rank tokens, balancedness, dropped tokens, prediction L1 / hot recall",
    "total_us": "median per step of count + replan + split + stats, every-step loop (lookahead/oracle)",
    "total_full_plan_us": "the same with plan_replicas from scratch instead of the policy's incremental plan",
    "total_history_us": "median per step of count + split + stats, history loop (plan not included: off the "
                        "critical path, see plan_history_amortised_us)",
}


def _steps(E: int, W: int, steps: int, rng: np.random.Generator) -> List[np.ndarray]:
    """[W, E] gathered counts of every step: Zipf-1.2 over an expert order redrawn every
    ``SWITCH_EVERY`` steps."""
    p = 1.0 / np.arange(1, E + 1) ** 1.2
    p /= p.sum()
    out = []
    for s in range(steps):
        if s % SWITCH_EVERY == 0:
            perm = rng.permutation(E)
        out.append(np.stack([rng.multinomial(TOKENS, p[perm]) for _ in range(W)]).astype(np.int64))
    return out


def _routes(counts_E: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """int64 [T, 1] routes of rank 0 that match its row of the counts."""
    return torch.from_numpy(rng.permutation(np.repeat(np.arange(counts_E.size), counts_E))).view(-1, 1)


class _FakeGather:
    """Stands in for the all-gather: writes the prepared rows of every rank into ``out``."""

    def __init__(self, W: int) -> None:
        self.W = W
        self.rows: torch.Tensor = torch.empty(0)

    def all_gather_into_tensor(self, out, payload, group=None):
        out.copy_(self.rows.reshape(-1))


def _count(expert_TK: torch.Tensor, E: int, group) -> tuple:
    """The layer's count bookkeeping: ``_gate``'s bincount, ``gather_step`` (with the step's
    fingerprint, weights version and lookahead section), the global sum."""
    taken = expert_TK[expert_TK >= 0]
    counts_E = torch.bincount(taken, minlength=E)
    g = comm.gather_step(counts_E, comm.Fingerprint(comm.SITE_LAYER, 1, 0, 0), group, tokens=expert_TK.shape[0])
    return g.counts_WE, g.counts_WE.sum(axis=0)


def _us(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e6


def _policy(E: int, W: int, predictor: str) -> ReplicationPolicy:
    cfg = ReplicationConfig(enabled=True, slots_per_rank=SLOTS, replan_interval=REPLAN_INTERVAL, predictor=predictor)
    return ReplicationPolicy(cfg, E, W)


def _all_valid(placement: Placement) -> np.ndarray:
    return np.ones(placement.phy2log_P.size, dtype=bool)


def measure(E: int, W: int, steps: int = 60, seed: int = 0) -> Dict[str, float]:
    """One row of the table: medians in microseconds (see ``DEFINITIONS``). The plans, the
    activation and the statistics are the layer's own code (``ReplicationPolicy``, ``step_stats``)."""
    rng = np.random.default_rng(seed)
    counts = _steps(E, W, steps, rng)
    routes = [_routes(c[0], rng) for c in counts]
    fake = _FakeGather(W)
    head = np.zeros((W, comm.HEADER), dtype=np.int64)
    head[:, 1] = TOKENS
    head[:, 2] = 1
    head[:, comm._HEAD:] = comm.Fingerprint(comm.SITE_LAYER, 1, 0, 0).values()
    # Every rank's payload as the all-gather returns it: header, counts, (empty) lookahead section.
    payloads = [torch.from_numpy(np.concatenate([head, c, np.zeros_like(c)], axis=1)) for c in counts]
    t: Dict[str, List[float]] = {k: [] for k in ("count", "split", "split_every", "plan", "plan_full",
                                                 "plan_history", "stats", "total", "total_full", "total_history")}
    with mock.patch.object(comm, "dist", SimpleNamespace(all_gather_into_tensor=fake.all_gather_into_tensor)), \
            mock.patch.object(comm, "group_size", lambda group: W):
        # History loop: EMA, re-planned every REPLAN_INTERVAL steps after the step's experts ran.
        policy = _policy(E, W, "ema")
        for s in range(steps):
            fake.rows = payloads[s]
            t0 = time.perf_counter()
            counts_WE, global_E = _count(routes[s], E, object())
            c_us = _us(t0)
            decision = policy.decide(global_E, True, _all_valid, grad=False)
            t0 = time.perf_counter()
            send_WP = transport(counts_WE, decision.placement)
            s_us = _us(t0)
            t0 = time.perf_counter()
            step_stats(s, decision.placement, counts_WE, send_WP, policy.prediction)
            st_us = _us(t0)
            t0 = time.perf_counter()
            new = policy.close(global_E, decision.placement, grad=False)
            if new is not None:
                plan_transfers(decision.placement, new)
                t["plan_history"].append(_us(t0))
            t["count"].append(c_us)
            t["split"].append(s_us)
            t["stats"].append(st_us)
            t["total_history"].append(c_us + s_us + st_us)

        # Every-step loop: the oracle plans for this step's counts (incrementally, ``replan``) and
        # its copies land at once; ``plan_replicas`` from scratch is timed beside it.
        policy = _policy(E, W, "oracle")
        for s in range(steps):
            fake.rows = payloads[s]
            t0 = time.perf_counter()
            counts_WE, global_E = _count(routes[s], E, object())
            c_us = _us(t0)
            t0 = time.perf_counter()
            full = plan_replicas(global_E, W, SLOTS).placement()
            plan_transfers(policy.active, full)
            f_us = _us(t0)
            t0 = time.perf_counter()
            decision = policy.decide(global_E, True, _all_valid, grad=False)
            if decision.prefetch_now:
                plan_transfers(policy.active, decision.prefetch)
                policy.land_pending()
            p_us = _us(t0)
            t0 = time.perf_counter()
            send_WP = transport(counts_WE, decision.placement)
            s_us = _us(t0)
            t0 = time.perf_counter()
            step_stats(s, decision.placement, counts_WE, send_WP, policy.prediction)
            st_us = _us(t0)
            policy.close(global_E, decision.placement, grad=False)
            t["split_every"].append(s_us)
            t["plan"].append(p_us)
            t["plan_full"].append(f_us)
            t["total"].append(c_us + p_us + s_us + st_us)
            t["total_full"].append(c_us + f_us + s_us + st_us)
    med = {k: statistics.median(v) if v else float("nan") for k, v in t.items()}
    return dict(E=E, W=W, S=SLOTS, steps=steps, count_us=med["count"], split_us=med["split"],
                split_every_step_us=med["split_every"], plan_us=med["plan"], plan_full_us=med["plan_full"],
                plan_history_us=med["plan_history"], plan_history_amortised_us=med["plan_history"] / REPLAN_INTERVAL,
                stats_us=med["stats"], total_us=med["total"], total_full_plan_us=med["total_full"],
                total_history_us=med["total_history"])


def table(rows: List[dict]) -> str:
    cols = ["E", "W", "count_us", "split_us", "split_every_step_us", "plan_us", "plan_full_us",
            "plan_history_amortised_us", "stats_us", "total_us", "total_full_plan_us", "total_history_us"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) if c in ("E", "W") else f"{r[c]:.0f}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the rows (and what each field means) here as JSON")
    ap.add_argument("--steps", type=int, default=60, help="steps per loop (medians over them; at least 50)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # NOTE: as under the launcher (OMP_NUM_THREADS=1); tiny ops only lose from threads
    rows = [measure(E, W, args.steps, args.seed) for E, W in GRID]
    print(f"Control path per layer per step, microseconds (medians over {args.steps} steps), S={SLOTS}, "
          f"{TOKENS} routes per rank, Zipf-1.2, hot experts redrawn every {SWITCH_EVERY} steps")
    print(table(rows))
    print("total_us: count + replan + split + stats (lookahead/oracle: plan every step, on the critical path); "
          "total_full_plan_us: the same with plan_replicas; total_history_us: count + split + stats "
          f"(ema/window: plan every {REPLAN_INTERVAL} steps, off the critical path, amortised in "
          "plan_history_amortised_us)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(definitions=DEFINITIONS, slots_per_rank=SLOTS, tokens_per_rank=TOKENS,
                           replan_interval=REPLAN_INTERVAL, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
