"""Many-rank emulation in one process: W virtual expert-parallel ranks, their expert work timed
for real, step time = the critical path (slowest rank) plus modelled all-to-all time.

For each batch and layer of a routing (a trace, or Zipf loads), each mode gives every virtual rank
its slots' row counts — ``stock``: E_loc experts padded to W * C rows (DeepSpeed dropless);
``no_replication``: its home experts' rows; ``predictive:ema``: the plan made from an EMA of earlier
batches (re-planned every ``replan_interval``), its shares from ``planner.split_loads``; ``oracle``:
the plan for the batch's own counts. Both plans come from the layer's own ``ReplicationPolicy``,
driven with a fake store (``driven.py``). The expert MLP then really runs on each slot's rows on this
CPU/GPU and is timed; a rank's time is the sum over its slots, the layer's time the slowest rank's
plus the two all-to-alls of the cost model (``costmodel._a2a_s``) with the given link parameters.
Slots with the same row count share one measurement (every rank of ``stock`` has the same work).

``python -m ds_moe_replicate.bench.emulate --ranks 8,16,32,64`` prints a table per W.

Legend: B batches, L layers, E experts, W virtual ranks, P physical slots, H hidden, F FFN.
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional

import numpy as np
import torch

from ..placement import Placement
from ..planner import balancedness, home_balancedness, split_loads
from ..predictor import EmaPredictor, OraclePredictor
from ..runtime import median, timed
from .common import expert_mlp
from .costmodel import ORACLE, Hardware, ModelShape, _a2a_s, replication_config
from .driven import DrivenLayer
from .workloads import zipf_shares

__all__ = ["ExpertTimer", "emulate", "zipf_counts"]

MODES = ("stock", "no_replication", "predictive:ema", ORACLE)


class ExpertTimer:
    """Times the expert MLP on n rows (median of ``repeats``), memoised per n."""

    def __init__(self, hidden: int, ffn: int, repeats: int = 3, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        torch.manual_seed(0)
        self.mlp = expert_mlp(hidden, ffn).to(device=device, dtype=dtype).eval()
        self.hidden, self.repeats, self.device, self.dtype = hidden, repeats, torch.device(device), dtype
        self.memo: Dict[int, float] = {0: 0.0}
        self.calls = 0

    def ms(self, rows: int) -> float:
        rows = int(round(rows))
        if rows not in self.memo:
            x = torch.randn(rows, self.hidden, device=self.device, dtype=self.dtype)
            with torch.no_grad():
                self.mlp(x)
                out = [timed(lambda: self.mlp(x))[1] for _ in range(self.repeats)]
            self.memo[rows] = median(out)
            self.calls += 1
        return self.memo[rows]


def zipf_counts(batches: int, layers: int, experts: int, routes: int, exponent: float, seed: int) -> np.ndarray:
    """[B, L, E] multinomial routes with Zipf shares, a fixed random hot-expert order per layer."""
    rng = np.random.default_rng(seed)
    z = zipf_shares(experts, exponent)
    out = np.zeros((batches, layers, experts), dtype=np.int64)
    for j in range(layers):
        out[:, j, rng.permutation(experts)] = rng.multinomial(routes, z, size=batches)
    return out


def _slot_rows(mode: str, counts_E: np.ndarray, W: int, placement: Optional[Placement]) -> np.ndarray:
    """[W, K] rows per slot of every virtual rank."""
    E = counts_E.size
    if mode == "stock":
        # NOTE: not a capacity: dropless DeepSpeed pads every expert to the largest count a rank
        # sends it, here with tokens spread evenly over the source ranks.
        pad_rows = int(np.ceil(counts_E.max() / W))
        return np.full((W, E // W), W * pad_rows, dtype=np.int64)
    rows_P = split_loads(counts_E, placement.phy2log_P, W, integral=True).numpy()[0]
    return rows_P.reshape(W, -1)


def emulate(counts_BLE: np.ndarray, W: int, S: int, timer: ExpertTimer, link: Hardware, ema_decay: float = 0.5,
            replan_interval: int = 4, tokens_per_rank: Optional[int] = None) -> Dict[str, Dict]:
    """Emulated ms per layer (median over batches of the mean over layers) and balancedness per mode.

    ``predictive:ema`` and ``oracle`` are the layer's own ``ReplicationPolicy``, one per layer,
    driven with a fake store (``driven.py``); an oracle's wait for its copies is not timed here.
    """
    B, L, E = counts_BLE.shape
    if E % W:
        raise ValueError(f"--ranks: W={W} must divide the number of experts E={E}")
    m = ModelShape("emulated", timer.hidden, 0, E, W, tokens_per_rank or int(counts_BLE[0, 0].sum() // W))
    ms = {k: np.zeros((B, L)) for k in MODES}
    bal = {k: np.zeros((B, L)) for k in MODES}
    fields = dict(ema_decay=ema_decay, replan_interval=replan_interval)
    home = Placement.home(E, W, S)
    driven = {"predictive:ema": [DrivenLayer(replication_config(S, EmaPredictor, **fields), E, W) for _ in range(L)],
              ORACLE: [DrivenLayer(replication_config(S, OraclePredictor, **fields), E, W) for _ in range(L)]}
    for b in range(B):
        for j in range(L):
            counts_E = counts_BLE[b, j]
            placements = {"stock": None, "no_replication": home}
            for mode, layers in driven.items():
                placements[mode] = layers[j].step_forward(counts_E).placement
            for mode in MODES:
                rows_WK = _slot_rows(mode, counts_E, W, placements[mode])
                rank_ms = np.array([sum(timer.ms(n) for n in row) for row in rows_WK])
                wire = rows_WK.sum(axis=1) if mode == "stock" else np.maximum(rows_WK.sum(axis=1), m.tokens_per_rank)
                ms[mode][b, j] = rank_ms.max() + 2e3 * _a2a_s(wire, m, link)
                bal[mode][b, j] = (home_balancedness(counts_E, W) if mode == "stock"
                                   else float(balancedness(rows_WK.sum(axis=1))))
    out = {}
    for mode in MODES:
        per_layer = np.median(ms[mode].mean(axis=1))
        # NOTE: medians over batches, so the first batch (before any plan exists) does not weigh in.
        out[mode] = dict(ms_per_layer=float(per_layer), balancedness=float(np.median(bal[mode].mean(axis=1))))
    for mode in MODES:
        out[mode]["speedup_vs_stock"] = out["stock"]["ms_per_layer"] / out[mode]["ms_per_layer"]
    return out


def main(argv=None) -> int:
    from .traces import load_trace

    ap = argparse.ArgumentParser(description="Emulate W expert-parallel ranks in one process (expert work timed "
                                             "for real, all-to-all modelled)")
    ap.add_argument("--ranks", default="8,16,32,64", help="comma list of W (each must divide --experts)")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--tokens-per-rank", type=int, default=256)
    ap.add_argument("--zipf", type=float, default=1.2)
    ap.add_argument("--trace", default=None, help="replay a trace (its E and L replace --experts/--layers)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--slots", type=int, default=2, help="replica slots per rank")
    ap.add_argument("--link-gbps", type=float, default=100.0, help="modelled all-to-all GB/s per rank")
    ap.add_argument("--latency-us", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        ranks = [int(w) for w in args.ranks.split(",") if w]
    except ValueError:
        ap.error(f"--ranks: expected a comma list of integers, got {args.ranks!r}")
    if any(w < 1 or w > 64 for w in ranks):
        ap.error(f"--ranks: each W must lie in [1, 64], got {ranks}")
    torch.set_num_threads(1)
    timer = ExpertTimer(args.hidden, args.ffn)
    link = Hardware("link", 1.0, 1.0, args.link_gbps * 1e9, args.link_gbps * 1e9, 64, args.latency_us * 1e-6, 0.0, 4)
    rows: List[Dict] = []
    print(f"Emulation: expert MLP H={args.hidden}, F={args.ffn} timed on this machine (fp32, 1 thread), "
          f"{args.slots} replica slots per rank, all-to-all modelled at {args.link_gbps} GB/s + {args.latency_us} us")
    print("| W | E | stock ms | no_replication ms | predictive:ema ms | oracle ms | predictive:ema speed-up | "
          "oracle speed-up | stock balancedness | predictive:ema balancedness |\n" + "|---" * 10 + "|")
    for W in ranks:
        if args.trace:
            counts = load_trace(args.trace).counts_BLE
        else:
            counts = zipf_counts(args.batches, args.layers, args.experts, args.tokens_per_rank * W, args.zipf,
                                 args.seed)
        if counts.shape[2] % W:
            ap.error(f"--ranks: W={W} does not divide E={counts.shape[2]}")
        r, run_ms = timed(lambda: emulate(counts, W, args.slots, timer, link, tokens_per_rank=args.tokens_per_rank))
        print(f"| {W} | {counts.shape[2]} | " + " | ".join(f"{r[k]['ms_per_layer']:.2f}" for k in MODES)
              + f" | {r['predictive:ema']['speedup_vs_stock']:.2f}x | {r[ORACLE]['speedup_vs_stock']:.2f}x | "
              f"{r['stock']['balancedness']:.2f} | {r['predictive:ema']['balancedness']:.2f} |", flush=True)
        rows.append(dict(W=W, experts=int(counts.shape[2]), seconds=run_ms / 1e3, modes=r))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
