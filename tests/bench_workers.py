"""Per-rank bodies of the benchmark tests (importable by spawned ranks)."""

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class RecordedTraces:
    """What the trace recorders saw on one rank."""

    stock_BLE: np.ndarray        # the stock stack's counts of this rank's tokens
    replicated_BLE: np.ndarray   # the replicated stack's counts, gathered over the group
    steered_BLE: np.ndarray      # the experts this rank's tokens were steered to


def bench_main(rank, argv):
    """The benchmark's entry point on this rank; returns its exit code."""
    from ds_moe_replicate.bench.bench import main

    return main(argv)


def predictors_main(rank, argv):
    """The predictor benchmark's entry point on this rank; returns its exit code."""
    from ds_moe_replicate.bench.predictors import main

    return main(argv)


def record_traces(rank, steps, layers, experts):
    """A stock stack and a replicated one (replication on) on the same steered batches, each with a
    ``TraceRecorder``; returns their ``RecordedTraces`` ([B, L, E] each)."""
    from ds_moe_replicate.bench.stack import build_stack
    from ds_moe_replicate.bench.traces import TraceRecorder
    from ds_moe_replicate.bench.workloads import Workload, assign, steer_tokens
    from ds_moe_replicate.layer import configure_replication

    W = dist.get_world_size()
    stock = build_stack("stock", 32, 64, experts, layers, W)
    rep = build_stack("replicated", 32, 64, experts, layers, W)
    configure_replication(rep, {"moe_replication": {"enabled": True, "slots_per_rank": 1, "replan_interval": 1}})
    rec_s, rec_r = TraceRecorder(), TraceRecorder()
    assert rec_s.attach(stock) == layers and rec_r.attach(rep) == layers
    wl = Workload("zipf", layers, experts, exponent=1.5, seed=3)
    targets = []
    with torch.no_grad():
        for b in range(steps):
            ex = assign(wl.shares(b), 96, 0.0, seed=rank * 31 + b)
            targets.append(np.stack([np.bincount(ex[:, j], minlength=experts) for j in range(layers)]))
            x = steer_tokens(ex, stock.gate_dirs(), 6.0, 0.5, seed=rank * 17 + b)
            stock(x)
            rep(x)
    return RecordedTraces(rec_s.trace().counts_BLE, rec_r.trace().counts_BLE, np.stack(targets))
