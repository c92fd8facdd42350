"""Per-rank bodies of the multi-process layer tests (importable by spawned ranks).

Each body builds a stock ``deepspeed.moe.layer.MoE`` and a ``ReplicatedMoE`` with the same
weights and returns a named record of what this rank saw, for the test to assert on.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ds_moe_replicate.comm import ReplicationError
from ds_moe_replicate.testing import build_pair
from ds_moe_replicate.testing import expert_mlp as expert
from ds_moe_replicate.testing import steer as skewed

__all__ = ["build_pair", "expert", "skewed"]


@dataclass
class StockComparison:
    """One rank's run beside the stock layer, one entry per step."""

    diff: List[float] = field(default_factory=list)           # max |stock - replicated| output
    l_aux_diff: List[float] = field(default_factory=list)     # |stock - replicated| l_aux
    counts_equal: List[bool] = field(default_factory=list)    # exp_counts identical
    versions: List[int] = field(default_factory=list)         # plan version serving the step
    balancedness: List[float] = field(default_factory=list)
    replicas: List[int] = field(default_factory=list)         # replicas serving the step
    bytes_moved: int = 0                                      # replica bytes moved over the run
    hook_calls: int = 0                                       # stats records the hook received


@dataclass
class BalanceStep:
    """One step with one hot expert."""

    diff: float                # max |stock - replicated| output
    balancedness: float        # of routes computed per rank
    counts_E: List[int]        # routes per expert, whole group


@dataclass
class UnevenRun:
    """Uneven token counts per rank against a dense reference."""

    diffs: List[float]                 # max |replicated - dense| per step (0 for an empty rank)
    rank_tokens: List[List[int]]       # routes each rank computed, per step


@dataclass
class Drops:
    """Routes dropped over capacity per step, whole group."""

    stock: List[int]
    ours: List[int]


@dataclass
class GradStep:
    """One training step beside the stock layer."""

    rel_grad_diff: float       # max relative parameter gradient difference
    input_grad_diff: float     # max |stock - replicated| input gradient
    replicas: int              # replicas serving the step
    training: bool             # the step ran the training path


@dataclass
class TrainingRun:
    off_diff: float            # max |stock - replicated| output with replication off
    steps: List[GradStep]


@dataclass
class MaskedStep:
    """One step with a used_token mask and a residual MoE."""

    diff: float
    l_aux_diff: float
    counts_equal: bool


@dataclass
class EncodedRun:
    checks: int                # replica tensors checked against their slot's encoding
    bytes_received: int        # replica bytes this rank received


@dataclass
class Toggle:
    """One ``deepspeed.initialize`` with the JSON section on or off."""

    enabled: bool              # engine.config's moe_replication.enabled
    replicated_ran: bool       # the layer took the replicated path (it has stats)


@dataclass
class PredictorStep:
    """One MoE layer at one step of the tiny Switch-style model."""

    step: int
    layer: int
    diff: float                # max |stock - replicated| model output
    plan_version: int
    phy2log: List[int]         # the active placement after the step
    balancedness: float
    late: bool                 # the prefetch had not landed, the old plan served
    prediction_l1: Optional[float]


def gate_weight(layer) -> torch.Tensor:
    return layer.deepspeed_moe.gate.wg.weight.detach()


def compare_with_stock(rank, k, num_experts, steps, replan_interval, tokens=48, slots=1, hidden=16):
    """Skewed batches whose hot expert moves every 3 steps: outputs, l_aux and exp_counts vs stock."""
    W = dist.get_world_size()
    stock, rep = build_pair(hidden=hidden, num_experts=num_experts, ep_size=W, k=k,
                            replication={"enabled": True, "slots_per_rank": slots, "replan_interval": replan_interval})
    seen = []
    rep.register_stats_hook(seen.append)
    out = StockComparison()
    for step in range(steps):
        hot = (step // 3) % num_experts
        x = skewed(tokens, hidden, gate_weight(stock), hot, 0.6, seed=100 * rank + step).view(2, tokens // 2, hidden)
        with torch.no_grad():
            a, la, ca = stock(x)
            b, lb, cb = rep(x)
        assert b.shape == a.shape and b.dtype == a.dtype
        out.diff.append((a - b).abs().max().item())
        out.l_aux_diff.append((la - lb).abs().item())
        out.counts_equal.append(bool(torch.equal(ca, cb)))
        s = rep.last_stats
        out.versions.append(s.plan_version)
        out.bytes_moved += s.bytes_moved
        out.balancedness.append(s.balancedness)
        out.replicas.append(s.num_replicas)
    out.hook_calls = len(seen)
    return out


def one_hot_expert_balance(rank, steps=6):
    """4 ranks, 8 experts, one expert takes most tokens: balancedness of computed tokens per rank."""
    W = dist.get_world_size()
    stock, rep = build_pair(num_experts=8, ep_size=W, k=1,
                            replication={"enabled": True, "slots_per_rank": 1, "replan_interval": 1})
    res = []
    for step in range(steps):
        x = skewed(64, 16, gate_weight(stock), 3, 0.5, seed=10 * rank + step)
        with torch.no_grad():
            a, _, _ = stock(x)
            b, _, _ = rep(x)
        res.append(BalanceStep((a - b).abs().max().item(), rep.last_stats.balancedness,
                               rep.last_stats.counts_E.tolist()))
    return res


def _all_experts(layer, num_experts):
    """Every rank's expert modules, gathered (for a dense reference)."""
    local = list(layer.deepspeed_moe.experts.deepspeed_experts)
    flat = torch.stack([torch.cat([p.detach().reshape(-1) for p in e.parameters()]) for e in local])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    flat_all = torch.cat(gathered)
    template = local[0]
    names = [n for n, _ in template.named_parameters()]
    shapes = [p.shape for p in template.parameters()]
    sizes = [p.numel() for p in template.parameters()]
    experts = []
    for e in range(num_experts):
        parts = torch.split(flat_all[e], sizes)
        experts.append({n: t.view(s) for n, t, s in zip(names, parts, shapes)})
    return template, experts


def dense_reference(x, gate_w, template, experts, k):
    """Every token through its top-k experts, computed locally with all expert weights."""
    probs = torch.softmax(x.float() @ gate_w.float().t(), dim=1)
    if k == 1:
        w, idx = probs.max(dim=1, keepdim=True)
    else:
        w, idx = probs.topk(k, dim=1)
        w = w / w.sum(dim=1, keepdim=True)
    out = torch.zeros_like(x)
    for e, params in enumerate(experts):
        rows, j = torch.nonzero(idx == e, as_tuple=True)
        if rows.numel():
            y = torch.func.functional_call(template, params, (x[rows],))
            out.index_add_(0, rows, w[rows, j].unsqueeze(1) * y)
    return out


def uneven_tokens(rank, k, steps=6):
    """Ranks hold different token counts (one holds none at some steps): vs a dense reference."""
    W = dist.get_world_size()
    _, rep = build_pair(num_experts=8, ep_size=W, k=k,
                        replication={"enabled": True, "slots_per_rank": 2, "replan_interval": 1})
    template, experts = _all_experts(rep, 8)
    diffs, tokens = [], []
    for step in range(steps):
        n = 0 if (rank == 1 and step % 2 == 0) else 5 + 23 * rank + 7 * step
        x = skewed(n, 16, gate_weight(rep), step % 8, 0.7, seed=rank * 31 + step) if n else torch.zeros(0, 16)
        with torch.no_grad():
            b, _, _ = rep(x)
            ref = dense_reference(x, gate_weight(rep), template, experts, k)
        assert b.shape == x.shape
        diffs.append((b - ref).abs().max().item() if n else 0.0)
        tokens.append(rep.last_stats.rank_tokens_W.tolist())
    return UnevenRun(diffs, tokens)


def capacity_drops(rank, k, steps=4):
    """Capacity factor 1.0: routes dropped by the stock layer vs by ours, same batches."""
    W = dist.get_world_size()
    stock, rep = build_pair(num_experts=4, ep_size=W, k=k, drop_tokens=True, eval_capacity_factor=1.0, min_capacity=1,
                            replication={"enabled": True, "slots_per_rank": 1, "replan_interval": 1,
                                         "dropless": False})
    stock_drops, our_drops = [], []
    for step in range(steps):
        x = skewed(64, 16, gate_weight(stock), 1, 0.6, seed=rank * 13 + step)
        with torch.no_grad():
            a, _, _ = stock(x)
            rep(x)
        # A token whose only route was dropped comes out exactly zero (k = 1).
        dropped = torch.tensor([int((a.abs().sum(dim=1) == 0).sum())])
        dist.all_reduce(dropped)
        stock_drops.append(int(dropped))
        our_drops.append(rep.last_stats.dropped_tokens)
    return Drops(stock_drops, our_drops)


def error_on_one_rank(rank, where):
    """Rank 1 fails (bad input, or its expert raises); every rank must raise, none may hang."""
    _, rep = build_pair(num_experts=4, ep_size=dist.get_world_size(), k=1,
                        replication={"enabled": True, "slots_per_rank": 1, "replan_interval": 1})
    x = torch.randn(12, 16)
    if rank == 1 and where == "input":
        x = torch.randn(12, 15)
    if rank == 1 and where == "expert":
        def broken(*_args, **_kwargs):
            raise RuntimeError("expert exploded")
        for e in rep.deepspeed_moe.experts.deepspeed_experts:
            e.forward = broken
    try:
        with torch.no_grad():
            rep(x)
    except ReplicationError as err:
        # The layer still works afterwards: the next step succeeds on every rank.
        with torch.no_grad():
            if where == "input":
                rep(torch.randn(12, 16))
        return str(err)
    return "no error"


def disabled_and_training(rank, steps=3):
    """Replication off: the stock path (outputs identical). Training mode with a hot expert:
    the replicated path runs, copies active from step 1, and every gradient matches stock."""
    W = dist.get_world_size()
    stock, rep = build_pair(num_experts=4, ep_size=W, k=2, replication={"enabled": False})
    x = skewed(32, 16, gate_weight(stock), 0, 0.5, seed=rank)
    with torch.no_grad():
        off_diff = (stock(x)[0] - rep(x)[0]).abs().max().item()
    stock2, rep2 = build_pair(num_experts=4, ep_size=W, k=1, seed=3,
                              replication={"enabled": True, "slots_per_rank": 1, "replan_interval": 1})
    stock2.train()
    rep2.train()
    out = []
    for step in range(steps):
        x = skewed(32, 16, gate_weight(stock2), 0, 0.5, seed=rank + step)
        stock2.zero_grad()
        rep2.zero_grad()
        xs = x.clone().requires_grad_(True)
        xr = x.clone().requires_grad_(True)
        (stock2(xs)[0] ** 2).sum().backward()
        (rep2(xr)[0] ** 2).sum().backward()
        rel = max(((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item()
                  for p, q in zip(stock2.parameters(), rep2.parameters()))
        s = rep2.last_stats
        out.append(GradStep(rel, (xs.grad - xr.grad).abs().max().item(), s.num_replicas, s.training))
    return TrainingRun(off_diff, out)


def used_token_and_residual(rank):
    """k = 1 with a used_token mask, and a residual MoE: vs stock.

    NOTE: DeepSpeed 0.19's top1gating fails on used_token with drop_tokens=False (topk gets a
    tensor k), so the stock layer runs with a capacity that can hold every token instead.
    """
    W = dist.get_world_size()
    stock, rep = build_pair(num_experts=4, ep_size=W, k=1, use_residual=True, drop_tokens=True,
                            eval_capacity_factor=4.0,
                            replication={"enabled": True, "slots_per_rank": 1, "replan_interval": 1})
    diffs = []
    for step in range(4):
        x = skewed(40, 16, gate_weight(stock), 2, 0.6, seed=rank * 5 + step)
        used = (torch.arange(40) % 3 != 0).float()
        with torch.no_grad():
            a, la, ca = stock(x, used)
            b, lb, cb = rep(x, used)
        diffs.append(MaskedStep((a - b).abs().max().item(), (la - lb).abs().item(), bool(torch.equal(ca, cb))))
    return diffs


def encoded_replicas(rank, steps=12):
    """Expert weights encode (expert, tensor); after every step each resident replica must hold
    exactly the encoding of the expert its slot is planned for. (12 steps: the re-plan keeps the
    copies that still serve, so it takes that many for every rank of 4 to hold one at a check.)"""
    W = dist.get_world_size()
    E = 2 * W
    _, rep = build_pair(num_experts=E, ep_size=W, k=1,
                        replication={"enabled": True, "slots_per_rank": 2, "replan_interval": 1})
    e_loc = E // W
    with torch.no_grad():
        for j, ex in enumerate(rep.deepspeed_moe.experts.deepspeed_experts):
            for t, p in enumerate(ex.parameters()):
                p.fill_(0.001 * (100 * (rank * e_loc + j) + t))
    checks, moves = 0, 0
    for step in range(steps):
        x = skewed(48, 16, gate_weight(rep), (step * 3) % E, 0.7, seed=rank * 11 + step)
        with torch.no_grad():
            rep(x)
        moves += rep.last_stats.bytes_received
        inner = rep.deepspeed_moe
        pl, store, table = inner.policy.active, inner.store, inner.table
        C = pl.slots_per_rank_total
        for s in range(store.num_slots):
            p = rank * C + e_loc + s
            e = int(pl.phy2log_P[p])
            if e < 0 or table.expert_P[p] != e:  # empty, or its copy still in flight
                continue
            for t, name in enumerate(store.names):
                want = 0.001 * (100 * e + t)
                got = store.params(s)[name]
                assert torch.all(got == torch.tensor(want, dtype=got.dtype)), (step, s, e, name)
                checks += 1
    return EncodedRun(checks, moves)


def deepspeed_initialize_toggle(rank):
    """The JSON section read from engine.config turns replication on and off, no code change."""
    import deepspeed

    from ds_moe_replicate import configure_replication

    results = []
    for enabled in (False, True):
        _, rep = build_pair(num_experts=4, ep_size=dist.get_world_size(), k=1, set_groups=False)
        model = nn.Sequential(nn.Linear(16, 16), rep)
        ds_config = {"train_micro_batch_size_per_gpu": 1,
                     "moe_replication": {"enabled": enabled, "slots_per_rank": 1, "replan_interval": 1}}
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        configure_replication(engine)
        with torch.no_grad():
            x = torch.randn(10, 16)
            engine.module[1](engine.module[0](x))
        results.append(Toggle(engine.config["moe_replication"]["enabled"], rep.last_stats is not None))
    return results


def predictor_run(rank, predictor, steps=6, late_rank=None, late_step=None):
    """Tiny Switch-style model, topics alternating per batch: stock vs ReplicatedMoE with
    ``predictor``. Returns a ``PredictorStep`` per step and MoE layer."""
    from ds_moe_replicate.layer import configure_replication
    from ds_moe_replicate.tiny_switch import TinySwitchConfig, build_tiny_switch, topic_tokens

    cfg = TinySwitchConfig(hidden=32, ffn=64, blocks=4, num_experts=4, vocab=256, topic_tokens=32)
    stock = build_tiny_switch(cfg, dist.get_world_size(), replicated=False)
    rep = build_tiny_switch(cfg, dist.get_world_size(), replicated=True)
    rep.load_state_dict(stock.state_dict(), strict=True)
    learned_path = None
    if predictor == "learned":
        import os
        import tempfile

        from ds_moe_replicate.train_predictor import distill

        box = [os.path.join(tempfile.mkdtemp(), "predictor.pt")]
        dist.broadcast_object_list(box, src=0)
        learned_path = box[0]
        distill(stock, cfg, learned_path, batches=4, batch=2, seq=48, epochs=30)
    configure_replication(rep, {"moe_replication": {"enabled": True, "slots_per_rank": 1, "replan_interval": 2,
                                                    "predictor": predictor, "learned_path": learned_path}})
    out = []
    for step in range(steps):
        if late_step is not None and step == late_step and rank == late_rank:
            store = rep.moe_layers()[1].deepspeed_moe.store
            store.poll = lambda: False  # this rank's transfers "have not landed" at this step
        x = topic_tokens(cfg, 2, 48, 0.7, seed=rank * 5 + step, topic=step % 2)
        with torch.no_grad():
            a = stock(x)
            b = rep(x)
        if late_step is not None and step == late_step and rank == late_rank:
            del store.poll
        diff = float((a - b).abs().max())
        for j, layer in enumerate(rep.moe_layers()):
            s = layer.last_stats
            phy = layer.deepspeed_moe.policy.active.phy2log_P.tolist()
            out.append(PredictorStep(step, j, diff, s.plan_version, phy, s.balancedness, s.prefetch_late,
                                     s.prediction_l1))
    return out
