"""Fault injection on real ranks (importable by spawned ranks): each case returns a named record
of what every rank saw, so the suite can assert no hang, no silent wrong result, and the same
error on every rank.

The reference is a stock ``deepspeed.moe.layer.MoE`` run dropless holding the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ds_moe_replicate import configure_replication
from ds_moe_replicate.comm import ReplicationError
from ds_moe_replicate.runtime import collective_device
from ds_moe_replicate.testing import build_pair, steer

H = 16


@dataclass
class CaseResult:
    """What one rank saw in one fault case."""

    diffs: List[float] = field(default_factory=list)   # max |stock - replicated| per compared step
    grad_diff: float = 0.0                              # max relative gradient difference
    replicas: List[int] = field(default_factory=list)   # replicas serving each compared step
    error: Optional[str] = None                         # the ReplicationError message, if raised
    other_error: Optional[str] = None                   # anything else raised (a failed case)
    recovered: Optional[bool] = None                    # a later step worked on every rank


def _skewed(layer, rank: int, step: int, tokens: int = 48, hot: int = 1) -> torch.Tensor:
    gate = layer.deepspeed_moe.gate.wg.weight.detach().float().cpu()
    return steer(tokens, H, gate, hot, 0.7, seed=100 * rank + step).to(layer.deepspeed_moe.gate.wg.weight.device)


def _pair(rank: int, slots: int = 1, predictor: str = "ema", **replication):
    W = dist.get_world_size()
    cfg = {"enabled": True, "slots_per_rank": slots, "replan_interval": 1, "predictor": predictor, **replication}
    return build_pair(hidden=H, num_experts=2 * W, ep_size=W, k=1, replication=cfg, device=collective_device())


def _compare(stock, rep, rank: int, step: int, res: CaseResult) -> None:
    x = _skewed(stock, rank, step).to(next(stock.parameters()).dtype)
    with torch.no_grad():
        a = stock(x)[0]
        b = rep(x)[0]
    # Relative to the output's scale (the weight changes below rescale the outputs).
    res.diffs.append(float((a - b).abs().max() / a.abs().max().clamp_min(1.0)))
    res.replicas.append(rep.last_stats.num_replicas)


def _warm(stock, rep, rank: int, res: CaseResult, steps: int = 3) -> None:
    for step in range(steps):
        _compare(stock, rep, rank, step, res)


def weights_change(rank: int, how: str) -> CaseResult:
    """Replicas active, then the weights change (``how``); outputs must still equal stock."""
    res = CaseResult()
    stock, rep = _pair(rank)
    _warm(stock, rep, rank, res)
    if how == "load_state_dict":
        state = {k: v * 2 for k, v in stock.state_dict().items()}
        stock.load_state_dict(state)
        rep.load_state_dict(state)
    elif how == "optimizer_step":
        x = _skewed(stock, rank, 50)
        for model in (stock, rep):
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            (model(x)[0] ** 2).mean().backward()
            opt.step()
            model.eval()
    elif how == "double":
        stock.double()
        rep.double()
    elif how == "to_in_flight":
        # A re-plan's copies are in flight (a new hot expert), then the model moves.
        x = _skewed(stock, rank, 7, hot=2)
        with torch.no_grad():
            stock(x)
            rep(x)
        stock.to(torch.float64)
        rep.to(torch.float64)
    elif how == "inplace_edit":
        with torch.no_grad():
            for model in (stock, rep):
                for p in model.deepspeed_moe.experts.parameters():
                    p.mul_(-1.5)
    for step in range(3, 8):
        _compare(stock, rep, rank, step, res)
    return res


def eval_backward(rank: int) -> CaseResult:
    """Backward through an eval-mode forward with replicas active: stock gradients."""
    res = CaseResult()
    stock, rep = _pair(rank)
    _warm(stock, rep, rank, res)
    x = _skewed(stock, rank, 10)
    stock.zero_grad()
    rep.zero_grad()
    (stock(x)[0] ** 2).sum().backward()
    (rep(x)[0] ** 2).sum().backward()
    res.replicas.append(rep.last_stats.num_replicas)
    res.grad_diff = max(((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item()
                        for p, q in zip(stock.parameters(), rep.parameters()))
    return res


def _expect_error(fn, res: CaseResult) -> None:
    try:
        fn()
    except ReplicationError as err:
        res.error = str(err)
    except Exception as err:  # noqa: BLE001 - recorded: the case fails on it
        res.other_error = f"{type(err).__name__}: {err}"


def fault(rank: int, where: str, world_fail_rank: int = 1) -> CaseResult:
    """Rank ``world_fail_rank`` fails at ``where``; every rank must raise ReplicationError."""
    res = CaseResult()
    extra = {"timeout_s": 3.0} if where == "transfer_timeout" else {}
    stock, rep = _pair(rank, predictor="oracle" if where == "land" else "ema", **extra)
    _warm(stock, rep, rank, res)
    inner = rep.deepspeed_moe
    me = rank == world_fail_rank
    x = _skewed(stock, rank, 20, hot=3 % (2 * dist.get_world_size()))
    if me:
        if where == "poll":
            inner.store.poll = _boom
        elif where == "land":
            inner.store.land = _boom
        elif where == "prefetch":
            inner.store.start = _boom
        elif where == "permute":
            import ds_moe_replicate.dispatch as d
            d.ops_permute_saved = d.ops.permute
            d.ops.permute = _boom
        elif where == "hook":
            rep.register_stats_hook(_boom)
        elif where == "float64":
            x = x.double()
        elif where == "expert":
            for e in inner.experts.deepspeed_experts:
                e.forward = _boom
        elif where == "transfer_timeout":
            # This rank's copies never arrive: its transfer stays in flight past timeout_s.
            class Stuck:
                started = 0.0
                reqs: list = []

                def done(self):
                    return False

                def wait(self, _t):
                    raise TimeoutError("stuck")

            import time
            inner.store.pending = Stuck()
            inner.store.pending.started = time.monotonic() - 10.0

    if where == "policy":
        # A predictor or planner bug fails on every rank alike (they decide from the same numbers).
        inner.policy.decide = _boom

    def step():
        with torch.no_grad():
            rep(x)

    _expect_error(step, res)
    if me and where == "permute":
        import ds_moe_replicate.dispatch as d
        d.ops.permute = d.ops_permute_saved
    return res


def _boom(*_args, **_kwargs):
    raise RuntimeError("injected failure")


def disagreement(rank: int, what: str) -> CaseResult:
    """Ranks that disagree must get a clear error, not a hang or a silent split."""
    res = CaseResult()
    W = dist.get_world_size()
    if what == "slots":
        _, rep = _pair(rank, slots=1 + (rank == 1))
    elif what == "enabled":
        _, rep = _pair(rank)
        if rank == 1:
            rep.configure({"enabled": False})
    elif what == "train_eval":
        _, rep = _pair(rank)
        rep.train(rank == 1)
    elif what == "lookahead":
        from ds_moe_replicate.testing import tiny_lm
        model = tiny_lm(W)
        configure_replication(model, {"moe_replication": {"enabled": True, "slots_per_rank": 1,
                                                          "predictor": "lookahead" if rank == 0 else "ema"}})
        tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(rank))

        def steps():
            with torch.no_grad():
                for _ in range(3):
                    model(tokens)
        _expect_error(steps, res)
        return res
    x = _skewed(rep, rank, 0)

    def steps():
        with torch.no_grad():
            for _ in range(3):
                rep(x)
    _expect_error(steps, res)
    return res


def reconfigure_lookahead(rank: int, times: int = 3) -> CaseResult:
    """Re-applying the same lookahead config any number of times keeps working (and exact)."""
    from ds_moe_replicate.testing import tiny_lm
    res = CaseResult()
    W = dist.get_world_size()
    stock = tiny_lm(W, replicated=False)
    model = tiny_lm(W)
    model.load_state_dict(stock.state_dict())
    cfg = {"moe_replication": {"enabled": True, "slots_per_rank": 1, "predictor": "lookahead"}}
    for t in range(times):
        configure_replication(model, cfg)
        for step in range(3):
            tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(rank * 7 + step + 10 * t))
            with torch.no_grad():
                res.diffs.append(float((stock(tokens) - model(tokens)).abs().max()))
            res.replicas.append(sum(layer.last_stats.num_replicas for layer in model.moe_layers()))
    return res


@dataclass
class DeviceRuleResult:
    """Collective calls made under the strict wrapper, by function name."""

    calls: dict = field(default_factory=dict)
    error: Optional[str] = None


def collectives_on_their_device(rank: int) -> DeviceRuleResult:
    """Every collective call site of a step (inference with prefetched copies, training with
    copies that travel and gradients that return, a static plan, the timer, the eval reduction)
    hands over tensors on the collective's device."""
    from ds_moe_replicate.eval.harness import _all_reduce
    from ds_moe_replicate.runtime import timed
    from ds_moe_replicate.testing.strict import strict_collectives

    res = DeviceRuleResult()
    stock, rep = _pair(rank)
    try:
        with strict_collectives() as calls:
            for step in range(3):
                _compare(stock, rep, rank, step, CaseResult())
            rep.train()
            x = _skewed(rep, rank, 9)
            (rep(x)[0] ** 2).mean().backward()
            rep.eval()
            inner = rep.deepspeed_moe
            inner.install(inner.policy.plan(np.arange(inner.num_experts, dtype=float) + 1, grad=False))
            timed(lambda: None)
            _all_reduce(torch.ones(2, device=collective_device()))
        res.calls = dict(calls)
    except AssertionError as err:
        res.error = str(err)
    return res


def training_exact(rank: int, steps: int = 4) -> CaseResult:
    """Inference with replicas moving, then training steps with copies that travel and gradients
    that return: outputs and gradients equal stock (on the collective's device: CUDA under NCCL)."""
    res = CaseResult()
    stock, rep = _pair(rank)
    _warm(stock, rep, rank, res, steps=4)
    for model in (stock, rep):
        model.train()
    for step in range(steps):
        x = _skewed(stock, rank, 30 + step)
        stock.zero_grad()
        rep.zero_grad()
        (stock(x)[0] ** 2).mean().backward()
        (rep(x)[0] ** 2).mean().backward()
        res.replicas.append(rep.last_stats.num_replicas)
        res.grad_diff = max(res.grad_diff, max(((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12))
                                               .item() for p, q in zip(stock.parameters(), rep.parameters())))
    return res
