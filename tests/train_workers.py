"""Per-rank bodies of the training tests: ``deepspeed.initialize`` + Adam on a small MoE model,
stock ``MoE`` dropless against ``ReplicatedMoE`` from the same weights (importable by spawned ranks)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import List

import torch
import torch.distributed as dist
from torch import nn

from ds_moe_replicate.testing import build_pair, steer


class Net(nn.Module):
    """Linear -> MoE -> Linear, regression on a fixed target."""

    def __init__(self, moe: nn.Module, hidden: int) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.inp = nn.Linear(hidden, hidden)
        self.moe = moe
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, l_aux, _ = self.moe(self.inp(x))
        return ((self.out(h) - y) ** 2).mean() + 0.01 * l_aux


@dataclass
class TrainRun:
    """What one run returns (named, not positional)."""

    stock_losses: List[float] = field(default_factory=list)
    rep_losses: List[float] = field(default_factory=list)
    max_rel_param_diff: float = 0.0
    replicas: List[int] = field(default_factory=list)
    trained_replicated: List[bool] = field(default_factory=list)
    resumed_losses: List[float] = field(default_factory=list)


def ds_config(zero: int, dtype: str, accum: int, replication: dict) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": accum,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
           "zero_optimization": {"stage": zero}, "gradient_clipping": 1.0,
           "moe_replication": replication}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def _engine(model: nn.Module, cfg: dict):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
    return engine


def train_pair(rank: int, zero: int = 0, dtype: str = "fp32", ep_size: int = 0, steps: int = 20, accum: int = 1,
               predictor: str = "ema", resume_at: int = 0, resume_replicated: bool = True) -> TrainRun:
    """Train stock and replicated models side by side on skewed batches (the hot expert takes
    about 60% of the routes); optionally save the replicated engine at ``resume_at`` and continue
    from the checkpoint in a fresh engine (replication on or off)."""
    from ds_moe_replicate import configure_replication

    W = dist.get_world_size()
    ep = ep_size or W
    E = 2 * ep
    H = 16
    replication = {"enabled": True, "slots_per_rank": 1, "replan_interval": 1, "predictor": predictor}
    stock_moe, rep_moe = build_pair(hidden=H, num_experts=E, ep_size=ep, k=1, set_groups=False)
    stock, rep = Net(stock_moe, H), Net(rep_moe, H)
    rep.load_state_dict(stock.state_dict())
    cfg = ds_config(zero, dtype, accum, replication)
    e_stock = _engine(stock, {**cfg, "moe_replication": {"enabled": False}})
    e_rep = _engine(rep, cfg)
    assert configure_replication(e_rep) == 1
    gate = rep_moe.deepspeed_moe.gate.wg.weight.detach().float()
    run = TrainRun()
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    ckpt = None
    batches = []
    for step in range(steps * accum):
        x = steer(8, H, gate, hot=1, share=0.55, seed=1000 * rank + step).to(dt)
        y = torch.sin(x.float() * 3).to(dt)
        batches.append((x, y))
    for i, (x, y) in enumerate(batches):
        for engine, losses in ((e_stock, run.stock_losses), (e_rep, run.rep_losses)):
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        s = rep_moe.last_stats
        run.replicas.append(s.num_replicas)
        run.trained_replicated.append(s.training)
        if resume_at and i + 1 == resume_at * accum:
            box = [tempfile.mkdtemp(prefix="ckpt_") if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            ckpt = box[0]
            e_rep.save_checkpoint(ckpt, tag="mid")
    for p, q in zip(e_stock.module.parameters(), e_rep.module.parameters()):
        rel = ((p.float() - q.float()).abs().max() / p.float().abs().max().clamp_min(1e-12)).item()
        run.max_rel_param_diff = max(run.max_rel_param_diff, rel)
    if ckpt is not None:
        _, fresh_moe = build_pair(hidden=H, num_experts=E, ep_size=ep, k=1, set_groups=False, seed=99)
        fresh = Net(fresh_moe, H)
        cfg2 = cfg if resume_replicated else {**cfg, "moe_replication": {"enabled": False}}
        e2 = _engine(fresh, cfg2)
        configure_replication(e2)
        e2.load_checkpoint(ckpt, tag="mid")
        for x, y in batches[resume_at * accum:]:
            loss = e2(x, y)
            e2.backward(loss)
            e2.step()
            run.resumed_losses.append(float(loss))
        if rank == 0:
            import shutil

            shutil.rmtree(ckpt, ignore_errors=True)
    return run


def worker_path() -> str:
    return os.path.dirname(__file__)
