"""Accuracy retention: the same examples through the original model and its DeepSpeed versions.

Modes, on the same examples, in this order:
- ``baseline``: the transformers model as transformers runs it (Switch made dropless unless
  ``keep_hf_capacity``; see ``hf.py``);
- ``stock``: sparse blocks swapped for stock ``deepspeed.moe.layer.MoE`` (dropless);
- ``replicated``: swapped for ``ReplicatedMoE`` with the config's replication;
- ``predicted_routing``: the seed paper's scheme (``predicted.py``): experts chosen by a predictor.

Every rank holds the whole dense model and its own experts; examples are split over all ranks
(data parallel) and the expert-parallel modes run with ``ep_size`` ranks per group. Optional
fine-tuning runs first, on the task's train split, through the DeepSpeed engine (data parallel).

Legend: B batch, L sparse layers, E experts, W expert-parallel ranks, V vocabulary, C classes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ReplicationConfig
from ..hf import DeepSpeedMoEBlock, find_moe_blocks, replace_moe_blocks, set_switch_capacity
from ..layer import ReplicatedMoE
from ..planner import balancedness
from ..report import write_json
from ..runtime import all_reduce, median, timed
from .metrics import compute_metrics
from .models import TINY_SWITCH, answer_logits, class_logits, collate, load_model, model_logits
from .predicted import use_predicted_routing
from .tasks import load_task

__all__ = ["EvalArgs", "run_eval", "MODES", "markdown_table"]

MODES = ("baseline", "stock", "replicated", "predicted_routing")
DEFAULT_REPLICATION = {"enabled": True, "slots_per_rank": 1, "replan_interval": 2}


@dataclass
class EvalArgs:
    model: str = TINY_SWITCH
    task: str = "synthetic"
    out: Optional[str] = None
    data_dir: Optional[str] = None
    modes: List[str] = field(default_factory=lambda: list(MODES))
    ep_size: Optional[int] = None  # default: the world size
    batch_size: int = 32
    max_len: int = 128
    train_steps: Optional[int] = None  # default: 300 for tiny-switch, else 0
    train_batch_size: int = 32
    lr: float = 3e-3
    train_size: Optional[int] = None
    eval_size: Optional[int] = None
    seed: int = 0
    deepspeed_config: Optional[str] = None
    keep_hf_capacity: bool = False
    progress: bool = True


def _rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _bar(iterable, desc: str, total: int, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def _aux_loss(model: nn.Module, out) -> torch.Tensor:
    cfg = model.config
    total = torch.zeros(())
    for key, coef in (("encoder_z_loss", "router_z_loss_coef"), ("decoder_z_loss", "router_z_loss_coef"),
                      ("encoder_aux_loss", "router_aux_loss_coef"), ("decoder_aux_loss", "router_aux_loss_coef"),
                      ("aux_loss", "router_aux_loss_coef")):
        value = out.get(key) if hasattr(out, "get") else None
        if isinstance(value, torch.Tensor):
            total = total + getattr(cfg, coef, 0.0) * value
    return total


def finetune(model: nn.Module, task, label_ids: List[int], args: EvalArgs, steps: int) -> Dict[str, Any]:
    """Fine-tune on this rank's share of the train split through the DeepSpeed engine (data
    parallel: gradients are averaged over all ranks, so every rank ends with the same weights)."""
    import deepspeed

    rank, world = _rank_world()
    ds_config = {"train_micro_batch_size_per_gpu": args.train_batch_size, "gradient_accumulation_steps": 1,
                 "gradient_clipping": 1.0, "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    engine.train()
    g = torch.Generator().manual_seed(args.seed + 17 * rank)
    shard = task.train[rank::world]
    t0, losses = time.perf_counter(), []
    for _ in _bar(range(steps), "fine-tune", steps, args.progress and rank == 0):
        pick = torch.randint(0, len(shard), (args.train_batch_size,), generator=g).tolist()
        ids, mask, labels = collate([shard[i] for i in pick])
        out = model_logits(engine, ids, mask, output_router_logits=True, config=model.config)
        loss = F.cross_entropy(class_logits(model, out, mask, label_ids), labels) + _aux_loss(model, out)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    model.eval()
    tail = losses[-20:]
    return {"steps": steps, "seconds": round(time.perf_counter() - t0, 2),
            "final_loss": sum(tail) / max(1, len(tail)), "lr": args.lr, "batch_per_rank": args.train_batch_size}


class _RouteCounter:
    """Routes per expert of every sparse layer for one batch, read from forward hooks."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        self.rows: List[torch.Tensor] = []
        self.dropped = 0
        self._handles = []
        if mode in ("stock", "replicated"):
            for m in model.modules():
                if isinstance(m, DeepSpeedMoEBlock):
                    self._handles.append(m.register_forward_hook(self._from_block))
        else:
            for _, block in find_moe_blocks(model) or self._wrapped_blocks(model):
                router = getattr(block, "router", None) or block.gate
                router = getattr(router, "router", router)  # PredictedRouter wraps the HF router
                self._handles.append(router.register_forward_hook(self._from_router))

    @staticmethod
    def _wrapped_blocks(model: nn.Module):
        from .predicted import PredictedRouter

        return [(n, m) for n, m in model.named_modules()
                if isinstance(getattr(m, "router", None), PredictedRouter)
                or isinstance(getattr(m, "gate", None), PredictedRouter)]

    def _from_block(self, block, _args, _out) -> None:
        self.rows.append(block.exp_counts.detach().reshape(-1).to(torch.int64).cpu())

    def _from_router(self, router, _args, out) -> None:
        if type(router).__name__ == "SwitchTransformersTop1Router":
            onehot = out[0].reshape(-1, out[0].shape[-1])
            self.rows.append(onehot.sum(dim=0).to(torch.int64).cpu())
            self.dropped += int((onehot.sum(dim=1) == 0).sum())
        else:
            idx = out[2]
            self.rows.append(torch.bincount(idx.reshape(-1), minlength=router.num_experts).cpu())

    def take(self) -> torch.Tensor:
        rows, self.rows = self.rows, []
        return torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.int64)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _variant(base: nn.Module, mode: str, ep_size: int, replication: ReplicationConfig) -> nn.Module:
    if mode == "baseline":
        return base
    model = copy.deepcopy(base)
    if mode == "predicted_routing":
        use_predicted_routing(model)
    else:
        replace_moe_blocks(model, ep_size=ep_size, mode=mode, replication=replication)
    return model.eval()


def _home_balancedness(counts_BLE: torch.Tensor, ep_size: int) -> float:
    """mean / max routes per rank under DeepSpeed's home placement, averaged over (batch, layer)."""
    if counts_BLE.numel() == 0:
        return 1.0
    return float(balancedness(counts_BLE.reshape(*counts_BLE.shape[:2], ep_size, -1).sum(dim=-1)).mean())


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t.copy_(all_reduce(t, op=op or dist.ReduceOp.SUM))
    return t


def evaluate_mode(model: nn.Module, mode: str, batches, label_ids: List[int], ep_size: int,
                  baseline_logits: Optional[List[torch.Tensor]], progress: bool) -> Dict[str, Any]:
    """Run every batch; returns predictions (of valid rows), answer logits, timings and stats."""
    rank, _ = _rank_world()
    counter = _RouteCounter(model, mode)
    rep_stats: List[Any] = []
    handles = [m.register_stats_hook(rep_stats.append) for m in model.modules() if isinstance(m, ReplicatedMoE)]
    preds: List[int] = []
    logits_out: List[torch.Tensor] = []
    ms: List[float] = []
    counts: List[torch.Tensor] = []
    diff = 0.0
    for b, (ids, mask, _labels, valid) in enumerate(_bar(batches, mode, len(batches), progress and rank == 0)):
        with torch.no_grad():
            out, elapsed = timed(lambda ids=ids, mask=mask: model_logits(model, ids, mask))
            ans = answer_logits(model, out, mask)
            cls = class_logits(model, out, mask, label_ids)
        ms.append(elapsed)
        counts.append(counter.take())
        preds.extend(cls.argmax(dim=1)[valid].tolist())
        logits_out.append(ans)
        if baseline_logits is not None and valid.any():
            diff = max(diff, float((ans[valid] - baseline_logits[b][valid]).abs().max()))
    counter.remove()
    for h in handles:
        h.remove()
    counts_BLE = _all_reduce(torch.stack(counts)) if counts and counts[0].numel() else torch.zeros(0, 0, 0)
    dropped = int(_all_reduce(torch.tensor([counter.dropped]))[0])
    if mode == "replicated":
        balanced = sum(s.balancedness for s in rep_stats) / max(1, len(rep_stats))
        dropped = sum(s.dropped_tokens for s in rep_stats)  # already summed over the group
    else:
        balanced = _home_balancedness(counts_BLE, ep_size)
    diff = float(_all_reduce(torch.tensor([diff]), dist.ReduceOp.MAX if dist.is_initialized() else None)[0])
    return {"preds": preds, "logits": logits_out, "ms_per_batch": median(ms), "dropped_tokens": dropped,
            "balancedness": balanced, "max_abs_logit_diff": diff,
            "replicas": max((s.num_replicas for s in rep_stats), default=0)}


def _batches(examples, rank: int, world: int, batch_size: int):
    """This rank's batches; every rank gets the same number (padded with invalid rows)."""
    shard = list(range(rank, len(examples), world))
    per_rank = math.ceil(len(examples) / world)
    n_batches = max(1, math.ceil(per_rank / batch_size))
    out = []
    for b in range(n_batches):
        idx = shard[b * batch_size:(b + 1) * batch_size]
        valid = [True] * len(idx)
        if not idx:  # NOTE: every rank of a group must call forward as often as the others
            idx, valid = [0], [False]
        ids, mask, labels = collate([examples[i] for i in idx])
        out.append((ids, mask, labels, torch.tensor(valid)))
    return out, shard


def _gather(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def resolve_modes(args: EvalArgs, known) -> Tuple[List[str], ReplicationConfig]:
    """The modes to run (``baseline`` first) and the replicated mode's section: the config file's
    as it is (absent: replication off), or without a file ``DEFAULT_REPLICATION`` (on)."""
    modes = ["baseline"] + [m for m in args.modes if m != "baseline"]
    unknown = set(modes) - set(known)
    if unknown:
        raise ValueError(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(known)}")
    replication = (ReplicationConfig.from_ds_config(args.deepspeed_config) if args.deepspeed_config
                   else ReplicationConfig.coerce(DEFAULT_REPLICATION))
    return modes, replication


def run_eval(args: EvalArgs) -> Optional[Dict[str, Any]]:
    """Fine-tune (optionally) and evaluate every mode; returns the report on rank 0 (None elsewhere)."""
    rank, world = _rank_world()
    ep_size = args.ep_size or world
    modes, replication = resolve_modes(args, MODES)
    t_start = time.perf_counter()
    model, tokenizer = load_model(args.model, args.seed)
    hf_capacity = None
    if not args.keep_hf_capacity:
        hf_capacity = getattr(model.config, "expert_capacity", None)
        set_switch_capacity(model, None)
    task = load_task(args.task, tokenizer, model.config.vocab_size, args.data_dir, args.max_len, args.train_size,
                     args.eval_size, args.seed)
    steps = args.train_steps if args.train_steps is not None else (300 if args.model == TINY_SWITCH else 0)
    tuned = finetune(model, task, task.label_ids, args, steps) if steps > 0 else None

    batches, shard = _batches(task.validation, rank, world, args.batch_size)
    results: Dict[str, Dict[str, Any]] = {}
    baseline_logits = None
    for mode in modes:
        variant = _variant(model, mode, ep_size, replication)
        res = evaluate_mode(variant, mode, batches, task.label_ids, ep_size, baseline_logits, args.progress)
        if mode == "baseline":
            baseline_logits = res["logits"]
        res.pop("logits")
        gathered = _gather((shard, res.pop("preds")))
        preds = [0] * len(task.validation)
        for idx, p in gathered:
            for i, v in zip(idx, p):
                preds[i] = v
        res["metrics"] = compute_metrics(task.metrics, preds, [e.label for e in task.validation])
        results[mode] = res
        del variant
    if rank != 0:
        return None
    primary = task.metrics[0]
    base = results["baseline"]["metrics"][primary]
    report = {
        "model": args.model, "task": args.task, "primary_metric": primary, "examples": len(task.validation),
        "world_size": world, "ep_size": ep_size, "replication": replication.model_dump(), "fine_tune": tuned,
        "hf_capacity": {"kept": args.keep_hf_capacity, "configured_expert_capacity": hf_capacity},
        "modes": {m: {"metrics": r["metrics"], "ms_per_batch": r["ms_per_batch"], "dropped_tokens": r["dropped_tokens"],
                      "balancedness": r["balancedness"], "replicas": r["replicas"]} for m, r in results.items()},
        "retention": {m: (r["metrics"][primary] / base if base else float("nan")) for m, r in results.items()},
        "max_abs_logit_diff": {m: r["max_abs_logit_diff"] for m, r in results.items()},
        "seconds": round(time.perf_counter() - t_start, 1), "args": asdict(args),
    }
    if args.out:
        write_json(args.out, report)
    return report


def markdown_table(report: Dict[str, Any]) -> str:
    primary = report["primary_metric"]
    rows = ["| mode | " + primary + " | retention | max abs logit diff | dropped tokens | balancedness | ms / batch |",
            "|---|---|---|---|---|---|---|"]
    for mode, r in report["modes"].items():
        rows.append(f"| {mode} | {r['metrics'][primary]:.4f} | {report['retention'][mode]:.4f} | "
                    f"{report['max_abs_logit_diff'][mode]:.1e} | {r['dropped_tokens']} | {r['balancedness']:.3f} | "
                    f"{r['ms_per_batch']:.1f} |")
    return "\n".join(rows)
