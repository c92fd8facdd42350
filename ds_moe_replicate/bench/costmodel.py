"""Cost model: projected time of one MoE layer forward per mode, on a GPU cluster or on this CPU.

One layer's time is modelled as the slowest rank's expert compute, plus the all-to-all
(dispatch and combine), plus the mode's bookkeeping:

- expert compute of a slot with n rows: ``max(4*H*F*n / flops, (2*H*F + 2*n*(H+F)) * b / mem_bw)``
  (two GEMMs, roofline: weights and activations read once), plus ``launch_s`` per slot;
- ``stock`` / ``stock_capacity`` (DeepSpeed's ``MOELayer``): every rank computes E_loc experts on
  W*C rows each, C the largest per-rank expert count (dropless) or DeepSpeed's capacity
  (``gating.capacity_per_expert``);
  the padded [E, C, H] buffer goes through the all-to-all; dispatch and combine are gathers
  (DeepSpeed >= 0.19.4's sparse routes) that write and read the padded buffer at memory bandwidth;
- ours (``no_replication``, ``static_history``, ``predictive:*``, ``oracle``): rank r computes the
  rows its plan gives it (``planner.split_loads``), the all-to-all carries only routed rows, plus a
  permute/combine of the routed rows at memory bandwidth;
- all-to-all: each rank sends and receives (W-1)/W of its rows; time = bytes / link + latency,
  the link being NVLink inside a node and the network between nodes (the slower part bounds it);
- replica transfers are overlapped with compute (not charged) except for ``oracle``, which waits;
- the replicated modes' plans come from the layer's own ``ReplicationPolicy`` (``driven.py``).

Tokens are assumed spread evenly over source ranks (local count = global / W) unless per-rank
counts are given. ``python -m ds_moe_replicate.bench.costmodel`` prints projections on a trace.

Legend: B batches, L layers, E experts, W expert-parallel ranks, P physical slots, H hidden, F FFN.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional

import numpy as np

from ..config import ReplicationConfig
from ..gating import capacity_per_expert
from ..placement import Placement
from ..planner import split_loads
from ..policy import ReplicationPolicy
from ..predictor import EmaPredictor, OraclePredictor, name_of
from .driven import DrivenLayer

ORACLE = name_of(OraclePredictor)  # mode name: the predictor's

__all__ = ["Hardware", "ModelShape", "HARDWARE", "MODELS", "layer_ms", "simulate", "project", "fit_zipf_exponent",
           "replication_config"]


@dataclass(frozen=True)
class Hardware:
    """Per-device parameters (rates in per second, bytes per element ``dtype_bytes``)."""

    name: str
    flops: float          # dense matmul FLOP/s reached (peak x efficiency)
    mem_bw: float         # HBM (or DRAM) bytes/s reached
    intra_bw: float       # all-to-all bytes/s per device inside a node (NVLink; gloo on CPU)
    inter_bw: float       # all-to-all bytes/s per device between nodes (network)
    gpus_per_node: int
    latency_s: float      # per all-to-all
    launch_s: float       # per expert GEMM pair
    dtype_bytes: int = 2


# NOTE: peak figures from the vendors' data sheets (dense bf16 989 TFLOP/s on both; HBM 3.35 vs
# 4.8 TB/s; NVLink 900 GB/s both directions = 450 per direction; 400 Gb/s InfiniBand per GPU),
# scaled by typical reached fractions: 60% of peak matmul, 80% of memory and link bandwidth.
HARDWARE: Dict[str, Hardware] = {
    "H100": Hardware("H100", 0.6 * 989e12, 0.8 * 3.35e12, 0.8 * 450e9, 0.8 * 50e9, 8, 15e-6, 8e-6),
    "H200": Hardware("H200", 0.6 * 989e12, 0.8 * 4.8e12, 0.8 * 450e9, 0.8 * 50e9, 8, 15e-6, 8e-6),
}


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    ffn: int
    experts: int
    ep: int
    tokens_per_rank: int = 4096
    k: int = 1
    capacity_factor: float = 1.0
    min_capacity: int = 4  # DeepSpeed's MoE default


MODELS: Dict[str, ModelShape] = {
    "switch-base-128": ModelShape("switch-base-128", 768, 3072, 128, 8),
    "switch-base-256": ModelShape("switch-base-256", 768, 3072, 256, 16),
}


def _expert_s(rows: np.ndarray, m: ModelShape, hw: Hardware) -> np.ndarray:
    flop = 4.0 * m.hidden * m.ffn * rows
    mem = (2.0 * m.hidden * m.ffn + 2.0 * rows * (m.hidden + m.ffn)) * hw.dtype_bytes
    return np.where(rows > 0, np.maximum(flop / hw.flops, mem / hw.mem_bw) + hw.launch_s, 0.0)


def _a2a_s(rows_W: np.ndarray, m: ModelShape, hw: Hardware) -> float:
    """One all-to-all where rank r exchanges ``rows_W[r]`` rows, (W-1)/W of them off-rank."""
    W = m.ep
    nbytes = rows_W.max() * m.hidden * hw.dtype_bytes * (W - 1) / W
    nodes = math.ceil(W / hw.gpus_per_node)
    if nodes == 1:
        return nbytes / hw.intra_bw + hw.latency_s
    off_node = nbytes * (W - hw.gpus_per_node) / max(W - 1, 1)
    return max((nbytes - off_node) / hw.intra_bw, off_node / hw.inter_bw) + hw.latency_s


def layer_ms(mode: str, counts_WE: np.ndarray, m: ModelShape, hw: Hardware, slot_rows_P: Optional[np.ndarray] = None,
             transfer_bytes: float = 0.0) -> float:
    """Modelled ms of one layer forward.

    Args:
        mode: ``stock``, ``stock_capacity``, or ``ours`` (any replicated mode).
        counts_WE: [W, E] routes each source rank sends to each expert.
        slot_rows_P: [P] rows per physical slot of the plan in force (``ours`` only; P = W * (E_loc + S)).
        transfer_bytes: replica weight bytes whose transfer this step waits for (``oracle``).
    """
    W, E = counts_WE.shape
    # T: tokens on the busiest source rank (each sends k routes per token).
    e_loc, T = E // W, counts_WE.sum(axis=1).max() / m.k
    if mode in ("stock", "stock_capacity"):
        # NOTE: dropless DeepSpeed pads every expert to the largest count any rank sends it;
        # with a capacity factor the padding is DeepSpeed's capacity.
        C = counts_WE.max() if mode == "stock" else int(capacity_per_expert(T, E, m.k, m.capacity_factor,
                                                                             m.min_capacity))
        compute = e_loc * float(_expert_s(np.array([W * C]), m, hw)[0])
        # Encode writes [E, C, H] from [T, H]; decode reads it back into [T, H] (read + write each).
        gathers = 2.0 * (E * C + T * m.k) * m.hidden * hw.dtype_bytes / hw.mem_bw
        comm = 2 * _a2a_s(np.full(W, E * C), m, hw)
        return 1e3 * (compute + gathers + comm)
    if mode != "ours":
        raise ValueError(f"mode must be 'stock', 'stock_capacity' or 'ours', got {mode!r}")
    K = slot_rows_P.size // W
    rank_s = _expert_s(slot_rows_P.astype(np.float64), m, hw).reshape(W, K).sum(axis=1)
    rows_W = slot_rows_P.reshape(W, K).sum(axis=1)
    permute = 4.0 * T * m.k * m.hidden * hw.dtype_bytes / hw.mem_bw  # permute + un-permute, read and write
    comm = 2 * _a2a_s(np.maximum(rows_W, counts_WE.sum(axis=1)), m, hw)
    wait = transfer_bytes / hw.intra_bw
    return 1e3 * (rank_s.max() + comm + permute + wait)


def _even_WE(counts_E: np.ndarray, W: int) -> np.ndarray:
    return np.tile(np.asarray(counts_E, dtype=np.float64) / W, (W, 1))


def replication_config(slots_per_rank: int, predictor: type = EmaPredictor, **fields) -> ReplicationConfig:
    """The ``moe_replication`` section an emulated replicated mode runs with (the layer's defaults
    for every field not given)."""
    return ReplicationConfig(enabled=True, slots_per_rank=slots_per_rank, predictor=name_of(predictor), **fields)


def simulate(counts_BLWE: np.ndarray, m: ModelShape, hw: Hardware, slots_per_rank: int, ema_decay: float = 0.5,
             replan_interval: int = 4, history: int = 4,
             replica_cost: float = ReplicationConfig().replica_cost) -> Dict[str, np.ndarray]:
    """Modelled ms per layer of every mode on a trace.

    The replicated modes are the layer's own ``ReplicationPolicy``, one per layer, driven with a
    fake store (``driven.py``): ``predictive:ema`` re-plans from its history every
    ``replan_interval`` steps and serves the plan from the next step; ``oracle`` plans each step's
    counts and waits for the copies that changed; ``static_history`` is the policy's plan for the
    mean of the first ``history`` batches, installed once.

    Args:
        counts_BLWE: [B, L, W, E] routes per source rank and expert (or [B, L, E]: spread evenly).
        slots_per_rank: S. ema_decay, replan_interval, replica_cost: ``moe_replication`` fields of
            the replicated modes. history: batches behind ``static_history``'s plan.

    Returns:
        mode -> [B, L] modelled ms.
    """
    c = np.asarray(counts_BLWE, dtype=np.float64)
    if c.ndim == 3:
        c = np.stack([np.stack([_even_WE(c[b, j], m.ep) for j in range(c.shape[1])]) for b in range(c.shape[0])])
    B, L, W, E = c.shape
    if W != m.ep or E != m.experts:
        raise ValueError(f"counts have W={W}, E={E}; the model shape {m.name} has ep={m.ep}, experts={m.experts}")
    glob_BLE = c.sum(axis=2)
    expert_bytes = (2 * m.hidden * m.ffn + m.hidden + m.ffn) * hw.dtype_bytes
    fields = dict(ema_decay=ema_decay, replan_interval=replan_interval, replica_cost=replica_cost)
    ema_cfg = replication_config(slots_per_rank, EmaPredictor, **fields)
    oracle_cfg = replication_config(slots_per_rank, OraclePredictor, **fields)
    out = {k: np.zeros((B, L)) for k in ("stock", "stock_capacity", "no_replication", "static_history",
                                         "predictive:ema", ORACLE)}
    home = Placement.home(E, W, slots_per_rank)
    static = [ReplicationPolicy(ema_cfg, E, W).plan(glob_BLE[:history, j].mean(axis=0), grad=False)
              for j in range(L)]
    ema = [DrivenLayer(ema_cfg, E, W, expert_bytes) for _ in range(L)]
    oracle = [DrivenLayer(oracle_cfg, E, W, expert_bytes) for _ in range(L)]
    for b in range(B):
        for j in range(L):
            counts_WE, glob_E = c[b, j], glob_BLE[b, j]
            out["stock"][b, j] = layer_ms("stock", counts_WE, m, hw)
            out["stock_capacity"][b, j] = layer_ms("stock_capacity", counts_WE, m, hw)
            for name, placement in (("no_replication", home), ("static_history", static[j]),
                                    ("predictive:ema", ema[j].step_forward(glob_E).placement)):
                out[name][b, j] = layer_ms("ours", counts_WE, m, hw, _slot_rows(glob_E, placement))
            step = oracle[j].step_forward(glob_E)
            moved = expert_bytes * float(step.waited_W.max())
            out[ORACLE][b, j] = layer_ms("ours", counts_WE, m, hw, _slot_rows(glob_E, step.placement), moved)
    return out


def _slot_rows(load_E: np.ndarray, placement: Placement) -> np.ndarray:
    """[P] rows per physical slot: the runtime split of ``load_E`` over ``placement``'s copies."""
    return split_loads(load_E, placement.phy2log_P, placement.ep_size).numpy()[0]


def fit_zipf_exponent(counts_E: np.ndarray) -> float:
    """Least-squares slope of log(share) on log(rank) over the non-empty experts (a Zipf fit)."""
    s = np.sort(np.asarray(counts_E, dtype=np.float64))[::-1]
    s = s[s > 0]
    if s.size < 2:
        return 0.0
    r = np.log(np.arange(1, s.size + 1))
    return float(-np.polyfit(r, np.log(s / s.sum()), 1)[0])


def project(counts_BLE: np.ndarray, m: ModelShape, hw: Hardware, slots_per_rank: int, seed: int = 0,
            **kw) -> Dict:
    """Projections for model ``m`` on a trace: the trace itself when its E matches, else Zipf
    loads with the exponent fitted to the trace (each layer's hot experts at random ids)."""
    B, L, E = counts_BLE.shape
    assumption = "trace replayed as recorded"
    counts = counts_BLE.astype(np.float64)
    if E != m.experts:
        a = float(np.median([fit_zipf_exponent(counts_BLE[b, j]) for b in range(B) for j in range(L)]))
        rng = np.random.default_rng(seed)
        z = 1.0 / np.arange(1, m.experts + 1) ** a
        z /= z.sum()
        perm = np.stack([rng.permutation(m.experts) for _ in range(L)])
        tokens = m.tokens_per_rank * m.ep * m.k
        counts = np.zeros((B, L, m.experts))
        for j in range(L):
            counts[:, j, perm[j]] = rng.multinomial(tokens, z, size=B)
        assumption = (f"trace has E={E}, model E={m.experts}: Zipf loads with the trace's fitted exponent "
                      f"{a:.2f}, {tokens} routes per layer, hot experts fixed per layer")
    else:
        counts = counts / counts.sum(axis=2, keepdims=True) * m.tokens_per_rank * m.ep * m.k
    ms = simulate(counts, m, hw, slots_per_rank, **kw)
    per_layer = {k: float(np.median(v.sum(axis=1)) / L) for k, v in ms.items()}
    return dict(model=asdict(m), hardware=asdict(hw), slots_per_rank=slots_per_rank, assumption=assumption,
                ms_per_layer=per_layer, speedup_vs_stock={k: per_layer["stock"] / v for k, v in per_layer.items()})


def assumptions(hw: Hardware) -> List[str]:
    return [
        f"{hw.name}: matmul {hw.flops / 1e12:.3g} TFLOP/s reached, memory {hw.mem_bw / 1e9:.0f} GB/s, "
        f"all-to-all {hw.intra_bw / 1e9:.1f} GB/s in a node of {hw.gpus_per_node}, {hw.inter_bw / 1e9:.1f} GB/s "
        f"between nodes, {hw.latency_s * 1e6:.0f} us per all-to-all, {hw.launch_s * 1e6:.0f} us per expert, "
        f"{hw.dtype_bytes}-byte elements",
        "layer time = slowest rank's expert GEMMs (roofline) + dispatch and combine all-to-alls (no overlap) "
        "+ bookkeeping; source ranks send evenly; attention and other layers not modelled",
        "stock: DeepSpeed pads every expert to the largest per-rank count C (dropless) and gathers into / out of "
        "the padded [E,C,H] buffer",
        "predictive:ema re-plans from the EMA every replan_interval steps, used from the next step, "
        "transfers hidden behind compute; oracle plans on each step's counts and waits for its copies",
    ]


def main(argv=None) -> int:
    from .traces import load_trace

    ap = argparse.ArgumentParser(description="Project ms per MoE layer and speed-ups on a GPU cluster from a trace")
    ap.add_argument("--trace", required=True, help="trace file (.json or .pt, see bench/traces.py)")
    ap.add_argument("--hardware", default="H100,H200", help=f"comma list of {sorted(HARDWARE)}")
    ap.add_argument("--hardware-json", default=None, help="JSON of Hardware fields (e.g. from calibrate_costmodel.py)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--slots", type=int, default=2, help="replica slots per rank")
    ap.add_argument("--tokens-per-rank", type=int, default=4096)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    trace = load_trace(args.trace)
    hws = []
    for name in [h for h in args.hardware.split(",") if h]:
        if name not in HARDWARE:
            ap.error(f"--hardware: unknown {name!r}; choose from {sorted(HARDWARE)}")
        hws.append(HARDWARE[name])
    if args.hardware_json:
        with open(args.hardware_json, encoding="utf-8") as fh:
            hws.append(Hardware(**json.load(fh)))
    rows = []
    for hw in hws:
        print("\n".join(["Assumptions:"] + [f"- {a}" for a in assumptions(hw)]))
        for name in [x for x in args.models.split(",") if x]:
            if name not in MODELS:
                ap.error(f"--models: unknown {name!r}; choose from {sorted(MODELS)}")
            m = replace(MODELS[name], tokens_per_rank=args.tokens_per_rank)
            p = project(trace.counts_BLE, m, hw, args.slots)
            print(f"- {name} on {hw.name}: {p['assumption']}")
            rows.append(dict(p, name=name))
    print(projection_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0


def projection_table(rows: List[Dict]) -> str:
    modes = list(rows[0]["ms_per_layer"]) if rows else []
    out = ["| model | GPU | EP | " + " | ".join(f"{k} ms" for k in modes) + " | predictive:ema speed-up | "
           "oracle speed-up |", "|" + "---|" * (len(modes) + 5)]
    for r in rows:
        out.append(f"| {r['name']} | {r['hardware']['name']} | {r['model']['ep']} | "
                   + " | ".join(f"{r['ms_per_layer'][k]:.3f}" for k in modes)
                   + f" | {r['speedup_vs_stock']['predictive:ema']:.2f}x | {r['speedup_vs_stock'][ORACLE]:.2f}x |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
