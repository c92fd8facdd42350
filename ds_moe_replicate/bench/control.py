"""Control-path benchmark: per layer per step, everything that is not expert compute or all-to-all.

    python -m ds_moe_replicate.bench.control [--out FILE.json] [--steps 100]

Emulated on one process: for each (E, W) every step draws a gathered ``[W, E]`` count matrix
(Zipf-1.2 popularity over a random expert order, 4096 routes per rank, k = 1; the hot experts
change every 20 steps) and runs the layer's own control code on it, as rank 0, S = 2 replica
slots per rank. Each piece is the function the layer calls:

- count: ``gating.count_routes`` of this rank's routes (freshly written, as the gate leaves
  them), the step's ``comm.Fingerprint`` (with the placement digest) and ``comm.gather_step``
  into the layer's ``comm.GatherBuffer``. Its collective is replaced by a copy of every rank's
  rows (prepared before the loop, all but the fingerprint); the copy's own time is measured and
  subtracted (the collective is not control path), so what is timed is the bookkeeping around it:
  payload, status and fingerprint checks, the sums over ranks. The copy still writes the gathered
  rows into the buffer before the control path reads them, as the collective does;
- decide: ``ReplicationPolicy.decide``. For the history predictors (``ema``, ``window``) it only
  picks the serving placement; ``lookahead`` / ``oracle`` re-plan there every step (incrementally,
  ``replan``), on the critical path, so for them it is reported as ``plan_us``;
- split: ``split.transport_rank`` (the row this rank sends, the columns it receives, the quotas);
- stats: what the layer does with the step's statistics when nothing observes them: it keeps
  their numbers (``ReplicationStage._stats``, a deferred record); ``stats_build_us`` is the cost
  of building the ``StepStats`` record (``hooks.step_stats``: rank loads, balancedness, dropped
  tokens, prediction L1 / recall), paid when a stats hook (e.g. DeepSpeed's monitor) or
  ``last_stats`` reads it;
- close: ``ReplicationPolicy.close``: the predictor's update; for history predictors, every
  ``replan_interval`` steps, also a re-plan (``replan`` from the active placement, as every plan
  of the policy), issued after the step's experts ran: reported per call and amortised.

Two step loops per (E, W), medians over the steps:

- history (EMA predictor, ``replan_interval`` = 4): ``total_history_us`` = count + decide + split
  + stats + close, every step (its re-plan included at the steps that make one);
  ``total_history_observed_us`` the same with the stats record built (a stats hook registered);
  ``total_history_mean_us`` the mean instead of the median (the re-plan spread over the steps);
- every step (an oracle that plans for the step's own counts from its previous placement; its
  copies land at once): ``total_us`` = count + decide (``plan_us``) + split + stats + close;
  ``total_mean_us`` the mean;
  ``plan_full_us`` times ``plan_replicas`` from scratch on the same counts, for comparison (the
  policy planned with it before this release).

Legend: E logical experts, W ranks, S replica slots per rank, T routes per rank.
"""

from __future__ import annotations

import argparse
import functools
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
from ..gating import count_routes
from ..placement import Placement, missing_transfers, plan_transfers
from ..planner import plan_replicas
from ..policy import ReplicationPolicy
from ..replicas import ReplicaTable
from ..split import transport_rank
from ..stage import ReplicationStage, StepState

__all__ = ["GRID", "measure", "main"]

GRID = [(E, W) for E in (8, 64, 256) for W in (2, 8, 64) if E >= W]
SLOTS = 2
TOKENS = 4096
REPLAN_INTERVAL = 4
SWITCH_EVERY = 20

DEFINITIONS = {
    "count_us": "gating.count_routes + the step's Fingerprint + comm.gather_step bookkeeping (its collective "
                "replaced by a copy whose time is subtracted)",
    "decide_us": "ReplicationPolicy.decide, history loop (no plan at this point)",
    "split_us": "split.transport_rank per step, history loop (placement changes every replan_interval steps)",
    "split_every_step_us": "split.transport_rank per step, every-step loop (placement from replan, sometimes new)",
    "plan_us": "ReplicationPolicy.decide of the oracle per step (replan from the active placement, the cost "
               "check, activation) + plan_transfers when it changed: every-step predictors, on the critical path",
    "plan_full_us": "plan_replicas from scratch + placement + plan_transfers per call, on the every-step loop's "
                    "counts (for comparison)",
    "plan_history_us": "ReplicationPolicy.close at a re-plan (replan from the active placement + cost check) + "
                       "plan_transfers, "
                       "history loop (after the step's experts ran)",
    "plan_history_amortised_us": "plan_history_us / replan_interval",
    "stats_us": "the layer's deferred statistics (ReplicationStage._stats: the step's numbers kept, no record built)",
    "stats_build_us": "hooks.step_stats: the StepStats record (rank loads, balancedness, dropped tokens, prediction "
                      "L1 / hot recall), built when a stats hook or last_stats reads it",
    "close_us": "ReplicationPolicy.close at steps without a re-plan (the predictor's update)",
    "total_us": "median per step of count + plan + split + stats + close, every-step loop (lookahead/oracle)",
    "total_mean_us": "the mean of the same per-step totals (a step that builds a new placement weighs in)",
    "total_history_us": "median per step of count + decide + split + stats + close, history loop, every step "
                        "(close includes the re-plan at the steps that make one)",
    "total_history_observed_us": "the same with the statistics record built (stats_build_us instead of stats_us)",
    "total_history_mean_us": "the mean of the history loop's per-step totals (its re-plan spread over the steps)",
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
    """Stands in for the all-gather: writes the prepared rows of every rank into ``out`` and
    keeps the time that took (the collective's, not the control path's)."""

    def __init__(self) -> None:
        self.rows: torch.Tensor = torch.empty(0)
        self.spent = 0.0

    def all_gather_into_tensor(self, out, payload, group=None):
        t0 = time.perf_counter()
        out.copy_(self.rows.reshape(-1))
        self.spent += time.perf_counter() - t0


def _count(expert_TK: torch.Tensor, E: int, placement: Placement, group, fake: _FakeGather,
           buffer: comm.GatherBuffer):
    """The layer's count bookkeeping (``_gate``'s count, the fingerprint, ``gather_step``);
    returns (Gathered, microseconds without the stand-in collective)."""
    fake.spent = 0.0
    t0 = time.perf_counter()
    counts_E = count_routes(expert_TK, E)
    fingerprint = comm.Fingerprint(comm.SITE_LAYER, 1, placement.version, placement.digest(), 0, 1, 0)
    g = comm.gather_step(counts_E, fingerprint, group, tokens=expert_TK.shape[0], version=0, buffer=buffer)
    return g, _us(t0) - fake.spent * 1e6


def _us(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e6


def _policy(E: int, W: int, predictor: str) -> ReplicationPolicy:
    cfg = ReplicationConfig(enabled=True, slots_per_rank=SLOTS, replan_interval=REPLAN_INTERVAL, predictor=predictor)
    return ReplicationPolicy(cfg, E, W)


class _Resident:
    """The layer's record of which copies are resident (``replicas.ReplicaTable``), kept as the
    layer keeps it when copies land at once: what ``decide`` asks every step (``valid``)."""

    def __init__(self, P: int, W: int) -> None:
        self.table = ReplicaTable(P)
        self.version_W = np.zeros(W, dtype=np.int64)

    def transfers(self, new: Placement):
        """The copies the layer moves for ``new`` (``ReplicationStage._move``): those not resident."""
        return missing_transfers(new, self.valid(new))

    def landed(self, new: Placement, transfers) -> None:
        self.table.begin(transfers, new, self.version_W)
        self.table.commit()

    def valid(self, placement: Placement) -> np.ndarray:
        return self.table.valid(placement, self.version_W)


def measure(E: int, W: int, steps: int = 60, seed: int = 0) -> Dict[str, float]:
    """One row of the table: medians in microseconds (see ``DEFINITIONS``). The plans, the
    activation, the split and the statistics are the layer's own code (``ReplicationPolicy``,
    ``transport_rank``, ``step_stats``)."""
    rng = np.random.default_rng(seed)
    counts = _steps(E, W, steps, rng)
    routes = [_routes(c[0], rng) for c in counts]
    fake = _FakeGather()
    t: Dict[str, List[float]] = {k: [] for k in ("count", "decide", "split", "split_every", "plan", "plan_full",
                                                 "plan_history", "stats", "stats_build", "close", "total",
                                                 "total_history", "total_history_observed")}
    with mock.patch.object(comm, "dist", SimpleNamespace(all_gather_into_tensor=fake.all_gather_into_tensor)), \
            mock.patch.object(comm, "group_size", lambda group: W):
        for every_step in (False, True):
            policy = _policy(E, W, "oracle" if every_step else "ema")
            # The layer's own statistics step (ReplicationStage._stats) on this policy.
            stage = SimpleNamespace(policy=policy, replication=policy.config,
                                    _stats=None)
            stage._stats = functools.partial(ReplicationStage._stats, stage)
            step = StepState()
            resident = _Resident(policy.home.phy2log_P.size, W)
            full = []
            buffer = comm.GatherBuffer()  # the layer's (``ReplicationStage.gather_buffer``)
            # Every rank's payload as the all-gather returns it: header, counts, an empty
            # lookahead section; prepared before the loop (only the fingerprint depends on the
            # step), so that preparing it does not sweep the caches between the timed steps.
            gathered = [np.concatenate([np.zeros((W, comm.HEADER), dtype=np.int64), c, np.zeros_like(c)], axis=1)
                        for c in counts]
            for rows in gathered:
                rows[:, 1], rows[:, 2] = TOKENS, 1
            for s in range(steps):
                active = policy.active
                gathered[s][:, comm._HEAD:comm.HEADER] = comm.Fingerprint(comm.SITE_LAYER, 1, active.version,
                                                                          active.digest(), 0, 1, 0).values()
                fake.rows = torch.from_numpy(gathered[s])
                # NOTE: the layer counts routes its gate has just written; a fresh copy stands in
                # for that write (untimed), so the count does not read them cold from memory.
                g, c_us = _count(routes[s].clone(), E, active, object(), fake, buffer)
                if every_step:
                    full.append((g.total_E.copy(), active))
                t0 = time.perf_counter()
                decision = policy.decide(g.total_E, True, resident.valid, grad=False)
                if decision.prefetch_now:
                    resident.landed(decision.prefetch, resident.transfers(decision.prefetch))
                    policy.land_pending()
                d_us = _us(t0)
                t0 = time.perf_counter()
                split = transport_rank(g.counts_WE, decision.placement, 0, True, total_E=g.total_E,
                                       counts_ptr=g.counts_ptr)
                s_us = _us(t0)
                t0 = time.perf_counter()
                pending = stage._stats(decision, g.total_E, split, step, False)
                st_us = _us(t0)
                t0 = time.perf_counter()
                pending()
                sb_us = _us(t0)
                t0 = time.perf_counter()
                new = policy.close(g.total_E, decision.placement, grad=False)
                transfers = resident.transfers(new) if new is not None else None
                cl_us = _us(t0)
                if new is not None:  # the copies land before the next step (untimed: transfers)
                    resident.landed(new, transfers)
                replanned = not every_step and s % REPLAN_INTERVAL == 0
                if replanned:
                    t["plan_history"].append(cl_us)
                else:
                    t["close"].append(cl_us)
                if every_step:
                    t["split_every"].append(s_us)
                    t["plan"].append(d_us)
                    t["total"].append(c_us + d_us + s_us + st_us + cl_us)
                else:
                    t["count"].append(c_us)
                    t["stats"].append(st_us)
                    t["stats_build"].append(sb_us)
                    t["decide"].append(d_us)
                    t["split"].append(s_us)
                    t["total_history"].append(c_us + d_us + s_us + st_us + cl_us)
                    t["total_history_observed"].append(c_us + d_us + s_us + sb_us + cl_us)
        # plan_replicas from scratch on the every-step loop's counts, in a loop of its own (its
        # milliseconds of work would otherwise flush the caches the timed steps run in).
        for total_E, active in full:
            t0 = time.perf_counter()
            plan_transfers(active, plan_replicas(total_E, W, SLOTS).placement())
            t["plan_full"].append(_us(t0))
    med = {k: statistics.median(v) if v else float("nan") for k, v in t.items()}
    return dict(E=E, W=W, S=SLOTS, steps=steps, count_us=med["count"], decide_us=med["decide"], split_us=med["split"],
                split_every_step_us=med["split_every"], plan_us=med["plan"], plan_full_us=med["plan_full"],
                plan_history_us=med["plan_history"], plan_history_amortised_us=med["plan_history"] / REPLAN_INTERVAL,
                stats_us=med["stats"], stats_build_us=med["stats_build"], close_us=med["close"],
                total_us=med["total"], total_mean_us=statistics.mean(t["total"]),
                total_history_us=med["total_history"], total_history_observed_us=med["total_history_observed"],
                total_history_mean_us=statistics.mean(t["total_history"]))


def table(rows: List[dict]) -> str:
    cols = ["E", "W", "count_us", "decide_us", "split_us", "split_every_step_us", "plan_us", "plan_full_us",
            "plan_history_amortised_us", "stats_us", "stats_build_us", "close_us", "total_us", "total_mean_us",
            "total_history_us", "total_history_observed_us", "total_history_mean_us"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) if c in ("E", "W") else f"{r[c]:.0f}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the rows (and what each field means) here as JSON")
    ap.add_argument("--steps", type=int, default=100, help="steps per loop (medians over them; at least 50)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # NOTE: as under the launcher (OMP_NUM_THREADS=1); tiny ops only lose from threads
    rows = [measure(E, W, args.steps, args.seed) for E, W in GRID]
    print(f"Control path per layer per step, microseconds (medians over {args.steps} steps), S={SLOTS}, "
          f"{TOKENS} routes per rank, Zipf-1.2, hot experts redrawn every {SWITCH_EVERY} steps")
    print(table(rows))
    print("total_us: count + plan + split + stats + close (lookahead/oracle: plan every step, on the critical "
          "path); total_history_us: count + decide + split + stats + close (ema/window: they re-plan every "
          f"{REPLAN_INTERVAL} steps, at a step's close); *_mean_us: means instead of medians")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(definitions=DEFINITIONS, slots_per_rank=SLOTS, tokens_per_rank=TOKENS,
                           replan_interval=REPLAN_INTERVAL, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
