"""Per-rank bodies of the AutoEP tests: tiny random Mixtral / Qwen3-MoE through DeepSpeed AutoEP,
with and without replication, side by side in one process (importable by spawned ranks).

Batches draw their tokens from a small part of the vocabulary, so routing is skewed and the
planner makes replicas; the comparison is with AutoEP as DeepSpeed ships it.
"""

import copy
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist

from hf_workers import VOCAB, build_tiny

REPLICATION = {"enabled": True, "slots_per_rank": 1, "replan_interval": 1, "replica_cost": 0.0}


def ds_config(family: str, replication=None, zero: int = 0, **extra) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 2,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
           "zero_optimization": {"stage": zero},
           "expert_parallel": {"enabled": True, "autoep_size": dist.get_world_size(), "preset_model": family}}
    if replication is not None:
        cfg["moe_replication"] = replication
    cfg.update(extra)
    return cfg


def skewed_batch(rank: int, step: int, batch: int = 2, seq: int = 12) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    ids = torch.randint(0, VOCAB // 8, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def engines(family: str, via: str, zero: int = 0, replication=None, train: bool = False, **extra):
    """AutoEP as shipped, and AutoEP with replication (through ``ds_moe_replicate.initialize``, or
    ``deepspeed.initialize`` + ``configure_replication``), from the same random model."""
    import deepspeed

    import ds_moe_replicate

    base = build_tiny(family).train(train)
    stock, *_ = deepspeed.initialize(model=copy.deepcopy(base), model_parameters=None,
                                     config=ds_config(family, zero=zero))
    model = copy.deepcopy(base)
    cfg = ds_config(family, replication or REPLICATION, zero=zero, **extra)
    if via == "initialize":
        rep, *_ = ds_moe_replicate.initialize(model=model, config=cfg)
    else:
        rep, *_ = deepspeed.initialize(model=model, config=cfg)
        assert ds_moe_replicate.configure_replication(rep) == 2
    return stock, rep


def layer_stats(engine) -> List:
    from ds_moe_replicate.autoep import ReplicatedAutoEPLayer

    return [m.last_stats for m in engine.module.modules() if isinstance(m, ReplicatedAutoEPLayer)]


@dataclass
class Run:
    max_abs_logit_diff: float = 0.0
    replicas: List[int] = field(default_factory=list)
    stock_losses: List[float] = field(default_factory=list)
    rep_losses: List[float] = field(default_factory=list)
    max_rel_param_diff: float = 0.0
    layer_types: List[str] = field(default_factory=list)
    tampered_diff: float = 0.0


def eval_equal(rank: int, family: str, via: str, steps: int = 4) -> Run:
    stock, rep = engines(family, via)
    stock.eval()
    rep.eval()
    run = Run(layer_types=sorted({type(m).__name__ for m in rep.module.modules() if "AutoEP" in type(m).__name__}))
    with torch.no_grad():
        for step in range(steps):
            batch = skewed_batch(rank, step)
            a = stock(input_ids=batch["input_ids"]).logits
            b = rep(input_ids=batch["input_ids"]).logits
            run.max_abs_logit_diff = max(run.max_abs_logit_diff, (a - b).abs().max().item())
            run.replicas.append(sum(s.num_replicas for s in layer_stats(rep)))
        # A wrong copy must show: scale every replica buffer behind the version checks' back.
        from ds_moe_replicate.autoep import ReplicatedAutoEPLayer

        for m in rep.module.modules():
            if isinstance(m, ReplicatedAutoEPLayer) and m._store is not None and m._store.buffers is not None:
                m._store.buffers.mul_(3.0)
        for step in range(steps):
            batch = skewed_batch(rank, step)
            a, b = stock(input_ids=batch["input_ids"]).logits, rep(input_ids=batch["input_ids"]).logits
            run.tampered_diff = max(run.tampered_diff, (a - b).abs().max().item())
    return run


def _param_diff(a, b) -> float:
    worst = 0.0
    for (n, p), (m, q) in zip(a.module.named_parameters(), b.module.named_parameters()):
        assert n == m, (n, m)
        rel = ((p.float() - q.float()).abs().max() / p.float().abs().max().clamp_min(1e-12)).item()
        worst = max(worst, rel)
    return worst


def train_equal(rank: int, family: str, zero: int, via: str = "initialize", steps: int = 10) -> Run:
    stock, rep = engines(family, via, zero=zero, train=True)
    run = Run()
    for step in range(steps):
        batch = skewed_batch(rank, step)
        for engine, losses in ((stock, run.stock_losses), (rep, run.rep_losses)):
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        run.replicas.append(sum(s.num_replicas for s in layer_stats(rep)))
    run.max_rel_param_diff = _param_diff(stock, rep)
    return run


@dataclass
class CheckpointRun:
    stock_from_replicated: float = 0.0
    replicated_from_stock: float = 0.0
    replicas: List[int] = field(default_factory=list)
    losses_after_load: List[float] = field(default_factory=list)


def checkpoint_round_trip(rank: int, family: str) -> CheckpointRun:
    """Train with replication, save; AutoEP without replication loads it; a replicated engine
    loads that one's save back; parameters must match at each hop."""
    import deepspeed

    import ds_moe_replicate

    out = CheckpointRun()
    box = [tempfile.mkdtemp(prefix="autoep_ckpt_") if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    root = box[0]
    rep, *_ = ds_moe_replicate.initialize(model=build_tiny(family).train(), config=ds_config(family, REPLICATION))
    for step in range(3):
        loss = rep(**skewed_batch(rank, step)).loss
        rep.backward(loss)
        rep.step()
        out.replicas.append(sum(s.num_replicas for s in layer_stats(rep)))
    rep.save_checkpoint(root, tag="rep")
    stock, *_ = deepspeed.initialize(model=build_tiny(family, seed=5).train(), config=ds_config(family))
    stock.load_checkpoint(root, tag="rep")
    out.stock_from_replicated = _param_diff(rep, stock)
    stock.save_checkpoint(root, tag="stock")
    back, *_ = ds_moe_replicate.initialize(model=build_tiny(family, seed=7).train(),
                                           config=ds_config(family, REPLICATION))
    back.load_checkpoint(root, tag="stock")
    out.replicated_from_stock = _param_diff(stock, back)
    for step in range(3, 5):
        loss = back(**skewed_batch(rank, step)).loss
        back.backward(loss)
        back.step()
        out.losses_after_load.append(float(loss.detach()))
    return out


def csv_monitor(rank: int, family: str, steps: int = 3) -> Dict[str, List[List[str]]]:
    """Eval forwards with csv_monitor on; rank 0 reads back the files the monitor wrote."""
    import ds_moe_replicate

    box = [tempfile.mkdtemp(prefix="autoep_csv_") if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    cfg = ds_config(family, REPLICATION, csv_monitor={"enabled": True, "output_path": box[0], "job_name": "rep"})
    rep, *_ = ds_moe_replicate.initialize(model=build_tiny(family), config=cfg)
    rep.eval()
    with torch.no_grad():
        for step in range(steps):
            rep(input_ids=skewed_batch(rank, step)["input_ids"])
    dist.barrier()
    found = {}
    if rank == 0:
        import csv

        for dirpath, _, files in os.walk(box[0]):
            for name in files:
                with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                    found[name] = list(csv.reader(fh))
    return found


def never_applied(rank: int) -> List[str]:
    """An enabled section on a model without MoE layers: a warning at the first forward only."""
    import ds_moe_replicate

    records: List[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("ds_moe_replicate.initialize").addHandler(Keep())
    model = torch.nn.Linear(4, 4)
    engine, *_ = ds_moe_replicate.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1,
                                                                  "moe_replication": {"enabled": True}})
    for _ in range(3):
        engine(torch.randn(2, 4))
    return records
