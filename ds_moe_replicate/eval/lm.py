"""Task ``stdlib``: next-byte accuracy and perplexity of the trained byte-level MoE model
(``launch/train.py``) on held-out documents of the standard library, in four modes.

    python -m ds_moe_replicate.eval --task stdlib --model RUN_DIR --out report.json
    deepspeed --num_gpus 2 launch/evaluate.py --task stdlib --model RUN_DIR --out report.json

``RUN_DIR`` is a training run's folder (its ``model_full.pt``). Windows of held-out documents
(the training split's rule, ``stdlib_text.py``; never trained on) are scored in every mode with
the same weights:

| mode | what runs |
|---|---|
| ``baseline`` | every expert in one process (``byte_lm.LocalMoE``): no DeepSpeed layer, no all-to-all |
| ``stock`` | DeepSpeed's ``MoE``, dropless, expert parallel over the ranks |
| ``replicated`` | ``ReplicatedMoE`` with the ``moe_replication`` section (default: on, 1 slot per rank) |
| ``predicted_routing`` | the seed paper's approach: a predictor *replaces the router* (below) |

In ``predicted_routing`` each MoE layer routes on what is known before the first block runs (the
token + position embeddings, through the layer's own pre-norm and gate) instead of its contextual
input; the experts then compute on the true input.

Reported per mode: accuracy (next byte = argmax), perplexity per byte and bits per byte, each with
a 95% confidence interval from a bootstrap over *documents* (windows of one file are not
independent), retention (accuracy over ``baseline``'s, paired bootstrap interval), the largest
logit difference from ``baseline`` over every position, balancedness (the replicated layer's own
figure; home placement otherwise) and ms per batch (slowest rank).

Legend: B windows per batch, S positions, V bytes (256), N windows, D documents, L MoE layers.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..byte_lm import ByteLM, ByteLMConfig, LocalMoE, build_byte_lm, load_full_state_dict
from ..config import ReplicationConfig
from ..report import write_json
from ..routing_observer import RoutingObserver
from ..runtime import all_reduce, timed
from ..stdlib_text import load_corpus

__all__ = ["LM_MODES", "run_lm_eval", "lm_markdown_table", "use_predicted_routing", "bootstrap_ci"]

LM_MODES = ("baseline", "stock", "replicated", "predicted_routing")
DEFAULT_WINDOWS = 256
_RESAMPLES = 1000


def _rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def use_predicted_routing(model: ByteLM) -> None:
    """Make every ``LocalMoE`` of ``model`` route on ``norm2(input of the first block)`` (in place)."""
    seen: Dict[str, torch.Tensor] = {}
    model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))
    for block in model.blocks:
        if not isinstance(block.moe, LocalMoE):
            raise TypeError("predicted routing wraps LocalMoE layers (build the model with kind='local')")
        block.moe.route_input = lambda _x, norm=block.norm2: norm(seen["x"])


def _load(run: str):
    path = os.path.join(run, "model_full.pt") if os.path.isdir(run) else run
    if not os.path.exists(path):
        raise FileNotFoundError(f"--model {run!r}: no model_full.pt (the folder a launch/train.py run wrote)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return ByteLMConfig(**blob["config"]), blob["state_dict"]


def _build(mode: str, cfg: ByteLMConfig, full, W: int, rank: int, replication: ReplicationConfig) -> nn.Module:
    from ..layer import configure_replication

    if mode in ("baseline", "predicted_routing"):
        model = build_byte_lm(cfg, kind="local")
        load_full_state_dict(model, full, 0, 1)
        if mode == "predicted_routing":
            use_predicted_routing(model)
    else:
        model = build_byte_lm(cfg, W, kind="stock" if mode == "stock" else "replicated", set_groups=True)
        load_full_state_dict(model, full, rank % W, W)
        if mode == "replicated":
            configure_replication(model, {"moe_replication": replication.model_dump()})
    return model.eval()


def _score(model: nn.Module, mode: str, windows_NS: torch.Tensor, docs_N: torch.Tensor, batch: int, W: int,
           group, baseline: Optional[List[torch.Tensor]], progress: bool) -> Dict[str, Any]:
    """This rank's windows through ``model``: per-window sums, logits (for the baseline), stats."""
    rank, world = _rank_world()
    idx = list(range(rank, windows_NS.shape[0], world))
    steps = math.ceil(math.ceil(windows_NS.shape[0] / world) / batch)
    observer = RoutingObserver(model.moe_layers(), group if mode in ("stock", "replicated") else None)
    rows, logits_out, ms, balance, replicas, diff = [], [], [], [], 0, 0.0
    it = range(steps)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=mode, leave=False)
    with torch.no_grad():
        for b in it:
            mine = idx[b * batch:(b + 1) * batch]
            # NOTE: a rank out of windows still runs a forward: the expert-parallel layers need every rank.
            x = windows_NS[mine] if mine else windows_NS[:1]
            logits, step_ms = timed(lambda: model(x[:, :-1]).float())
            ms.append(step_ms)
            seen = observer.take(W)
            balance.append(seen["balancedness"])
            replicas = max(replicas, seen["replicas"])
            if not mine:
                logits_out.append(None)
                continue
            target = x[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
            nll = nll.view(target.shape).sum(dim=1)
            correct = (logits.argmax(dim=-1) == target).sum(dim=1)
            rows += [(int(docs_N[i]), float(n), int(c), target.shape[1]) for i, n, c in zip(mine, nll, correct)]
            logits_out.append(logits)
            if baseline is not None:
                diff = max(diff, float((logits - baseline[b]).abs().max()))
    observer.remove()
    t = torch.tensor([diff, float(np.median(ms))], dtype=torch.float64)
    if dist.is_initialized():
        t = all_reduce(t, dist.ReduceOp.MAX)
    return dict(rows=rows, logits=logits_out, max_abs_logit_diff=float(t[0]), ms_per_batch=float(t[1]),
                balancedness=float(np.mean(balance)), replicas=replicas)


def bootstrap_ci(per_doc: Dict[str, np.ndarray], stat, resamples: int = _RESAMPLES, seed: int = 0) -> List[float]:
    """95% interval of ``stat(sums)`` when documents are resampled with replacement.

    Args:
        per_doc: arrays [D] of per-document sums (e.g. ``nll``, ``correct``, ``tokens``), aligned.
        stat: function of a dict of resampled totals (scalars) -> float.

    Returns:
        [low, high] (2.5th and 97.5th percentiles).
    """
    rng = np.random.default_rng(seed)
    D = len(next(iter(per_doc.values())))
    draws = rng.integers(0, D, size=(resamples, D))
    values = [stat({k: v[d].sum() for k, v in per_doc.items()}) for d in draws]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def _per_doc(rows) -> Dict[str, np.ndarray]:
    docs = sorted({r[0] for r in rows})
    at = {d: i for i, d in enumerate(docs)}
    out = {k: np.zeros(len(docs)) for k in ("nll", "correct", "tokens")}
    for d, n, c, t in rows:
        out["nll"][at[d]] += n
        out["correct"][at[d]] += c
        out["tokens"][at[d]] += t
    return out


def _metrics(per_doc: Dict[str, np.ndarray]) -> Dict[str, Any]:
    acc = lambda s: s["correct"] / s["tokens"]  # noqa: E731
    ppl = lambda s: math.exp(s["nll"] / s["tokens"])  # noqa: E731
    total = {k: v.sum() for k, v in per_doc.items()}
    return dict(accuracy=float(acc(total)), accuracy_ci=bootstrap_ci(per_doc, acc),
                perplexity=float(ppl(total)), perplexity_ci=bootstrap_ci(per_doc, ppl),
                bits_per_byte=float(total["nll"] / total["tokens"] / math.log(2)))


def _retention_ci(mode: Dict[str, np.ndarray], base: Dict[str, np.ndarray]) -> List[float]:
    """Paired over documents: the same resampled documents for the mode and the baseline."""
    both = {"c": mode["correct"], "b": base["correct"], "t": mode["tokens"]}
    return bootstrap_ci(both, lambda s: s["c"] / s["b"] if s["b"] else float("nan"))


def run_lm_eval(args) -> Optional[Dict[str, Any]]:
    """Evaluate a trained run (``args.model``) on held-out windows in every mode of ``args.modes``.

    Args:
        args: an ``EvalArgs`` (``model`` = the run folder; ``eval_size`` windows, default 256;
            ``max_len`` bytes per window, at most the model's ``seq``; ``batch_size`` windows per
            rank per forward; ``deepspeed_config`` for the replicated mode's section).

    Returns:
        The report on rank 0 (None elsewhere); also written to ``args.out`` when given.
    """
    rank, world = _rank_world()
    W = args.ep_size or world
    from .harness import resolve_modes

    modes, replication = resolve_modes(args, LM_MODES)
    t_start = time.perf_counter()
    cfg, full = _load(args.model)
    seq = min(args.max_len, cfg.seq)
    corpus = load_corpus()
    count = args.eval_size or DEFAULT_WINDOWS
    # NOTE: another seed than the training job's before/after windows, same held-out documents.
    windows, docs = corpus.held_out_windows(count, seq, seed=args.seed + 1)
    results: Dict[str, Dict[str, Any]] = {}
    base_logits = None
    for mode in modes:
        model = _build(mode, cfg, full, W, rank, replication)
        group = model.moe_layers()[0].deepspeed_moe.ep_group if mode in ("stock", "replicated") else None
        res = _score(model, mode, windows, docs, args.batch_size, W, group, base_logits, args.progress)
        if mode == "baseline":
            base_logits = res["logits"]
        res.pop("logits")
        parts = [None] * world
        if dist.is_initialized() and world > 1:
            dist.all_gather_object(parts, res.pop("rows"))
        else:
            parts = [res.pop("rows")]
        res["per_doc"] = _per_doc([r for p in parts for r in p])
        results[mode] = res
        del model
    if rank != 0:
        return None
    base = results["baseline"]["per_doc"]
    report = {
        "task": "stdlib", "model": args.model, "model_config": cfg.to_dict(), "data": corpus.describe(),
        "windows": int(windows.shape[0]), "seq": seq, "tokens": int(base["tokens"].sum()),
        "documents": int(len(base["tokens"])), "world_size": world, "ep_size": W,
        "replication": replication.model_dump(), "confidence": "95%, bootstrap over documents "
        f"({_RESAMPLES} resamples)",
        "modes": {m: dict(_metrics(r["per_doc"]), balancedness=r["balancedness"], replicas=r["replicas"],
                          ms_per_batch=r["ms_per_batch"]) for m, r in results.items()},
        "retention": {m: float(r["per_doc"]["correct"].sum() / base["correct"].sum()) for m, r in results.items()},
        "retention_ci": {m: _retention_ci(r["per_doc"], base) for m, r in results.items()},
        "max_abs_logit_diff": {m: r["max_abs_logit_diff"] for m, r in results.items()},
        "labels": {"predicted_routing": "the seed paper's approach: a predictor replaces the router (each layer "
                                        "routes on the embeddings through its own norm and gate)"},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if args.out:
        write_json(args.out, report)
    return report


def lm_markdown_table(report: Dict[str, Any]) -> str:
    """The report as a markdown table, one row per mode."""
    rows = ["| mode | next-byte accuracy (95% CI) | perplexity (95% CI) | bits / byte | retention (95% CI) | "
            "max abs logit diff | balancedness | ms / batch |", "|---|---|---|---|---|---|---|---|"]
    for mode, r in report["modes"].items():
        lo, hi = r["accuracy_ci"]
        plo, phi = r["perplexity_ci"]
        rlo, rhi = report["retention_ci"][mode]
        rows.append(f"| {mode} | {r['accuracy']:.4f} ({lo:.4f}-{hi:.4f}) | {r['perplexity']:.3f} ({plo:.3f}-{phi:.3f}) "
                    f"| {r['bits_per_byte']:.3f} | {report['retention'][mode]:.4f} ({rlo:.4f}-{rhi:.4f}) | "
                    f"{report['max_abs_logit_diff'][mode]:.1e} | {r['balancedness']:.3f} | {r['ms_per_batch']:.1f} |")
    return "\n".join(rows)
