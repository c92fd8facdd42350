"""Per-rank bodies of the language-model tests (importable by spawned ranks)."""

import os

import torch
import torch.distributed as dist

TINY = ["--hidden", "32", "--heads", "2", "--layers", "2", "--experts", "4", "--ffn", "32", "--seq", "32",
        "--batch", "2", "--heldout-seqs", "8", "--eval-batch", "2", "--max-files", "60", "--log-every", "0",
        "--no-progress"]


def train_twice(rank, out, steps):
    """Train the tiny model with the config's replication on, then off (same seed): returns
    (summary with replication, summary without) on rank 0, None elsewhere."""
    import json

    from ds_moe_replicate.train_lm import parse_args, train

    with open("configs/train_demo.json") as fh:
        config = json.load(fh)
    # Re-plan at every step, so the held-out pass after training runs with replicas.
    config["moe_replication"]["replan_interval"] = 1
    # NOTE: one file per rank: ranks writing one shared file raced (a rank read it half-written).
    path = os.path.join(out, f"ds_config_rank{rank}.json")
    with open(path, "w") as fh:
        json.dump(config, fh)
    common = TINY + ["--steps", str(steps), "--deepspeed_config", path, "--eval-batch", "1"]
    on = train(parse_args(common + ["--out", os.path.join(out, "on")]))
    off = train(parse_args(common + ["--out", os.path.join(out, "off"), "--no-replication"]))
    return (on, off) if rank == 0 else None


def local_matches_expert_parallel(rank, k):
    """The same weights as a LocalMoE model (every expert here) and as a stock and a replicated
    expert-parallel model: returns the largest output difference of each from the local one."""
    from ds_moe_replicate.byte_lm import ByteLMConfig, build_byte_lm, full_state_dict, load_full_state_dict
    from ds_moe_replicate.layer import configure_replication

    W = dist.get_world_size()
    cfg = ByteLMConfig(hidden=32, heads=2, layers=2, experts=4, k=k, ffn=32, seq=24, seed=3)
    stock = build_byte_lm(cfg, W, kind="stock", set_groups=True).eval()
    rep = build_byte_lm(cfg, W, kind="replicated", set_groups=True).eval()
    configure_replication(rep, {"moe_replication": {"enabled": True, "slots_per_rank": 1, "replan_interval": 1}})
    full = full_state_dict(stock, W)
    local = build_byte_lm(cfg, kind="local").eval()
    load_full_state_dict(local, full, 0, 1)
    load_full_state_dict(rep, full, rank, W)
    x = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(rank))
    diffs = {"stock": 0.0, "replicated": 0.0}
    with torch.no_grad():
        for _ in range(3):  # several steps, so replicas are planned and used
            ref = local(x)
            diffs["stock"] = max(diffs["stock"], float((stock(x) - ref).abs().max()))
            diffs["replicated"] = max(diffs["replicated"], float((rep(x) - ref).abs().max()))
    # A fresh model built for this rank draws exactly the experts the full state dict holds for it.
    fresh = full_state_dict(build_byte_lm(cfg, W, kind="stock"), W)
    same_init = all(torch.equal(fresh[k_], build_byte_lm(cfg, kind="local").state_dict()[k_]) for k_ in fresh)
    return diffs, same_init


def lm_eval(rank, run_dir, eval_size):
    """The ``stdlib`` task of the harness on this world; the report on rank 0."""
    from ds_moe_replicate.eval import EvalArgs
    from ds_moe_replicate.eval.lm import run_lm_eval

    return run_lm_eval(EvalArgs(model=run_dir, task="stdlib", eval_size=eval_size, batch_size=3, max_len=32,
                                progress=False))


def train_checked(rank, out, steps, broken_steps):
    """Train the tiny model with ``--check-exact-every 1`` (replicas planned at every step, at no
    cost); then, with every replica's output scaled by 1 + 1e-2 (a wrong replicated path), for
    ``broken_steps`` more steps. Returns (summary, summary of the broken run) on rank 0."""
    import json

    from ds_moe_replicate.layer import ReplicatedMOELayer
    from ds_moe_replicate.train_lm import parse_args, train

    with open("configs/train_demo.json") as fh:
        config = json.load(fh)
    config["moe_replication"].update(replan_interval=1, replica_cost=0.0)
    # NOTE: one file per rank: ranks writing one shared file raced (a rank read it half-written).
    path = os.path.join(out, f"ds_config_rank{rank}.json")
    with open(path, "w") as fh:
        json.dump(config, fh)
    common = TINY + ["--deepspeed_config", path, "--eval-batch", "1", "--check-exact-every", "1"]
    good = train(parse_args(common + ["--steps", str(steps), "--out", os.path.join(out, "good")]))
    honest = ReplicatedMOELayer._run_replica

    def wrong(self, *args):
        return honest(self, *args) * (1.0 + 1e-2)

    ReplicatedMOELayer._run_replica = wrong
    try:
        bad = train(parse_args(common + ["--steps", str(broken_steps), "--out", os.path.join(out, "bad")]))
    finally:
        ReplicatedMOELayer._run_replica = honest
    return (good, bad) if rank == 0 else None
