"""Where a predictor's step time goes: the predictor benchmark with timers around the control path.

    deepspeed --num_gpus 2 launch/profile_predictors.py --deepspeed_config configs/demo.json \
        --predictors lookahead --workloads switching [--json out.json]

Runs ``bench/predictors.py`` unchanged and wraps, from the outside, the functions that
make up a replicated forward: the layer's own gate, the next layer's gate (lookahead), the
all-gathers, planning, the start and landing of replica transfers, the split, dispatch, experts
and combine. Each wrapper adds wall time (``perf_counter``) to a total per predictor and name (the
benchmark runs one model at a time, and the layer forward says whose it is); rank 0 prints
milliseconds per layer forward, warm-up included, and every rank's totals go to ``--json``.
Nested names (``prefetch`` holds ``plan_replicas`` and ``store.start``) are not disjoint.
"""

import functools
import json
import sys
import time
from collections import defaultdict

import torch.distributed as dist

from ds_moe_replicate import dispatch, layer, lookahead, policy, replicas, stage
from ds_moe_replicate.bench import predictors

TOTAL_MS = defaultdict(float)  # "predictor/name" -> ms
CALLS = defaultdict(int)
FORWARD = "moe_forward (whole layer)"
_current = ["?"]  # the predictor of the model now running (the benchmark runs one model at a time)


def _timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            key = f"{_current[0]}/{name}"
            TOTAL_MS[key] += (time.perf_counter() - t0) * 1e3
            CALLS[key] += 1
    return wrapper


def _tracking(fn, predictor_of):
    """Wrap ``fn`` so that the timers it encloses are charged to ``predictor_of(self)``."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        _current[0] = predictor_of(self)
        return fn(self, *args, **kwargs)
    return wrapper


def _wrap(owner, attr, name):
    setattr(owner, attr, _timed(name, getattr(owner, attr)))


class _TimedDist:
    """``torch.distributed`` as ``replicas`` sees it, with the posting of sends and receives timed."""

    def __init__(self, real) -> None:
        self._real = real
        self.isend = _timed("store.start: post isend", real.isend)
        self.irecv = _timed("store.start: post irecv", real.irecv)

    def __getattr__(self, name):
        return getattr(self._real, name)


def _entry_predictor(hook) -> str:
    nxt = hook.chain.next_of(hook)
    return "unlinked" if nxt is None else nxt.replication.predictor


def install() -> None:
    """Wrap every timed function where its callers look it up."""
    _wrap(layer.ReplicatedMOELayer, "_replicated_forward", FORWARD)
    layer.ReplicatedMOELayer._replicated_forward = _tracking(layer.ReplicatedMOELayer._replicated_forward,
                                                             lambda self: self.replication.predictor)
    _wrap(layer.ReplicatedMOELayer, "_gate", "own gate + bincount")
    _wrap(lookahead, "predict_counts", "lookahead: next layer's gate")
    _wrap(lookahead.EntryHook, "__call__", "lookahead: entry hook (gate + all-gather + prefetch)")
    lookahead.EntryHook.__call__ = _tracking(lookahead.EntryHook.__call__,
                                             lambda self: _entry_predictor(self))
    _wrap(layer, "gather_step", "all-gather of counts (layer)")
    _wrap(lookahead, "gather_step", "all-gather of counts (entry hook)")
    _wrap(policy.ReplicationPolicy, "offer", "policy.offer (plan for a prediction ahead)")
    _wrap(policy.ReplicationPolicy, "decide", "policy.decide")
    _wrap(policy.ReplicationPolicy, "close", "policy.close (history re-plan)")
    _wrap(policy, "plan_replicas", "plan_replicas")
    _wrap(policy, "replan", "replan (incremental)")
    _wrap(stage.ReplicationStage, "_move", "move copies (plan transfers + start)")
    _wrap(replicas.ReplicaStore, "poll", "poll transfers")
    _wrap(replicas.ReplicaStore, "start", "store.start (post sends/recvs)")
    _wrap(replicas.ReplicaStore, "land", "store.land (wait for weights)")
    replicas.flatten_expert = _timed("store.start: flatten home weights", replicas.flatten_expert)
    replicas.dist = _TimedDist(replicas.dist)
    _wrap(layer, "transport_rank", "split (transport_rank)")
    _wrap(layer, "dispatch", "dispatch (permute + all-to-all)")
    _wrap(layer.ReplicatedMOELayer, "_run_slots", "experts (home + replica slots)")
    _wrap(layer, "combine", "combine (all-to-all + un-permute)")
    _wrap(dispatch, "all_to_all", "all_to_all (inside dispatch and combine)")


def main() -> int:
    argv = sys.argv[1:]
    out = None
    if "--json" in argv:
        i = argv.index("--json")
        out = argv[i + 1]
        del argv[i:i + 2]
    install()
    rc = predictors.main(argv)
    rank = dist.get_rank()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(rank=rank, total_ms=dict(TOTAL_MS), calls=dict(CALLS)))
    if rank == 0:
        print("[profile] ms per replicated layer forward (totals over the run, warm-up included, divided by the "
              "layer forwards of that predictor), rank 0 / rank 1:")
        for key in sorted(TOTAL_MS):
            pred = key.split("/")[0]
            per = [g["total_ms"].get(key, 0.0) / max(1, g["calls"].get(f"{pred}/{FORWARD}", 1)) for g in gathered]
            print(f"  {key:70s} " + "  ".join(f"{v:8.2f}" for v in per) + f"   ({CALLS[key]} calls on rank 0)")
        if out:
            with open(out, "w") as fh:
                json.dump(dict(argv=argv, ranks=gathered), fh, indent=1)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
