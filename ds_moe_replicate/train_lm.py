"""Train the byte-level MoE language model (``byte_lm.py``) on the standard library's text.

    deepspeed --num_gpus 2 launch/train.py --deepspeed_config configs/train_demo.json --out DIR

Every rank builds the model with ``ReplicatedMoE`` layers, goes through ``deepspeed.initialize``
(the config's optimizer, ZeRO stage, precision) and ``configure_replication(engine)`` (the
config's ``"moe_replication"`` section; ``--no-replication`` or a config without it turns it off).
Ranks are data parallel over training documents and expert parallel over the experts. Each step
the routes per expert of every MoE layer are summed over the expert-parallel group and recorded
(``traces.py`` format). Before and after training, a fixed set of windows of held-out documents
is scored in eval mode. ``DIR`` receives:

- ``checkpoint/``: ``engine.save_checkpoint`` (DeepSpeed's layout, experts per rank);
- ``model_full.pt``: every expert in one file with the model's sizes (``byte_lm.load_full_state_dict``),
  what the evaluation harness and the predictor benchmark load;
- ``trace_train.json``: routes per expert of every layer at every training step;
- ``trace_heldout.json``: the same for the batches of the final held-out evaluation;
- ``summary.json``: per-step loss, held-out loss before/after, tokens/s, balancedness, the data
  split, the settings and where the files are; with ``--check-exact-every N``, ``exact_check``:
  every N-th step, the step's loss and gradients with replication on against the stock layer's on
  the same weights and batch (``exact_check``).

Legend: B sequences per rank, S positions, L MoE layers, E experts, W expert-parallel ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .byte_lm import ByteLMConfig, build_byte_lm, full_state_dict
from .config import ReplicationConfig
from .routing_observer import RoutingObserver
from .runtime import all_reduce, timed
from .stdlib_text import HELD_OUT_SHARE, Corpus, load_corpus
from .traces import TraceRecorder

__all__ = ["heldout_loss", "exact_check", "train", "main"]

logger = logging.getLogger(__name__)


def heldout_loss(engine, windows_BS: torch.Tensor, batch: int, observer: Optional[RoutingObserver] = None,
                 recorder: Optional[TraceRecorder] = None, ep_size: int = 1, device=None) -> Dict[str, float]:
    """Mean next-token cross-entropy (nats per byte) over ``windows_BS`` in eval mode, all ranks.

    Each rank scores ``windows_BS[rank::world]`` in batches of ``batch``; every rank runs the
    same number of forwards (the expert-parallel layers need it). Collective over the world.

    Args:
        engine: the DeepSpeed engine (or the model).
        windows_BS: int64 [N, S + 1] windows, the same on every rank.
        batch: sequences per forward per rank.
        observer, recorder: when given, each forward's routing is recorded as a trace batch.
        ep_size: expert-parallel ranks (for the observer).

    Returns:
        ``loss`` over all windows of all ranks, and with an observer the mean ``balancedness`` and
        the most ``replicas`` in use at one forward; the engine is left in training mode.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = windows_BS[rank::world]
    steps = math.ceil(math.ceil(windows_BS.shape[0] / world) / batch)
    total = torch.zeros(2, dtype=torch.float64)
    balance, replicas = [], 0
    engine.eval()
    with torch.no_grad():
        for i in range(steps):
            chunk = mine[i * batch:(i + 1) * batch]
            valid = chunk.shape[0]
            if valid == 0:  # NOTE: a rank with no window left still joins the layers' collectives
                chunk = windows_BS[:1]
            chunk = chunk.to(device) if device is not None else chunk
            logits = engine(chunk[:, :-1])
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1),
                                  reduction="sum")
            if valid:
                total += torch.tensor([float(nll), chunk[:, 1:].numel()], dtype=torch.float64)
            if observer is not None:
                seen = observer.take(ep_size)
                balance.append(seen["balancedness"])
                replicas = max(replicas, seen["replicas"])
                if recorder is not None:
                    for j, c in enumerate(seen["counts_LE"]):
                        recorder.record(j, c)
    total = all_reduce(total)
    engine.train()
    out = dict(loss=float(total[0] / total[1]))
    if balance:
        out.update(balancedness=float(np.mean(balance)), replicas=replicas)
    return out


def _loss_and_grads(model, x: torch.Tensor, params: List[torch.nn.Parameter], aux_loss_coef: float, rng: torch.Tensor):
    torch.set_rng_state(rng)
    logits = model(x[:, :-1])
    lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
    l_aux = model.l_aux
    grads = torch.autograd.grad(lm_loss + aux_loss_coef * l_aux, params, allow_unused=True)
    return float(lm_loss.detach()), float(l_aux.detach()), [None if g is None else g.detach() for g in grads]


def _rel(a: float, b: float) -> float:
    return 0.0 if a == b else abs(a - b) / max(abs(b), 1e-30)


def exact_check(model, x: torch.Tensor, aux_loss_coef: float) -> Dict[str, float]:
    """This rank's differences between the replicated and the stock layer on one training batch.

    On the current weights, runs the model twice on ``x`` (int64 [B, S + 1]) and differentiates
    the training loss with ``torch.autograd.grad`` (nothing reaches ``.grad``, the optimizer and
    the DeepSpeed engine are not touched): once with replication as configured, once with every
    MoE layer on the stock forward. Each layer's replication state is restored afterwards
    (``ReplicationStage.shadow``), and the random state is the same for both forwards and
    restored, so the training step that follows runs as it would without the check. Collective:
    call on every rank at the same step. ``model`` is ``engine.module``.

    Returns:
        ``loss_rel_diff`` (LM loss), ``l_aux_rel_diff``, ``grad_rel_diff_max`` (over parameters,
        ``||g_rep - g_off|| / ||g_off||``), ``replicas_active`` (replica slots the replicated
        forward used, all layers) and ``lm_loss_rep`` (this rank's replicated LM loss).
    """
    layers = [m.deepspeed_moe for m in model.moe_layers()]
    params = [p for p in model.parameters() if p.requires_grad]
    rng = torch.get_rng_state()
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(layer.shadow(enabled=True))
        runs = [layer.runs for layer in layers]
        lm_rep, aux_rep, g_rep = _loss_and_grads(model, x, params, aux_loss_coef, rng)
        if any(layer.runs != r + 1 for layer, r in zip(layers, runs)) or not layers[0].replication.enabled:
            raise RuntimeError("exact check: the replicated forward did not run in every MoE layer")
        replicas = sum(layer.last_stats.num_replicas for layer in layers)
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(layer.shadow(enabled=False))
        runs = [layer.runs for layer in layers]
        lm_off, aux_off, g_off = _loss_and_grads(model, x, params, aux_loss_coef, rng)
        if any(layer.runs != r for layer, r in zip(layers, runs)):
            raise RuntimeError("exact check: a replicated forward ran with replication off")
    torch.set_rng_state(rng)
    worst = 0.0
    for a, b in zip(g_rep, g_off):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        num, den = float((a.double() - b.double()).norm()), float(b.double().norm())
        worst = max(worst, 0.0 if num == 0.0 else (num / den if den > 0.0 else math.inf))
    return dict(loss_rel_diff=_rel(lm_rep, lm_off), l_aux_rel_diff=_rel(aux_rep, aux_off), grad_rel_diff_max=worst,
                replicas_active=float(replicas), lm_loss_rep=lm_rep)


def _ds_config(args) -> Dict:
    with open(args.deepspeed_config, encoding="utf-8") as fh:
        ds_config = json.load(fh)
    if args.batch is not None:
        ds_config["train_micro_batch_size_per_gpu"] = args.batch
    if args.no_replication:
        ds_config.pop("moe_replication", None)
    ReplicationConfig.from_ds_config(ds_config)  # refuse a bad section before starting anything
    return ds_config


def train(args) -> Optional[Dict]:
    """The whole job on this rank (collective); returns the summary on rank 0, None elsewhere."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from .layer import configure_replication
    from .runtime import device_for_rank

    t_start = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    W = args.ep_size or world
    device = device_for_rank()
    ds_config = _ds_config(args)
    batch = int(ds_config["train_micro_batch_size_per_gpu"])
    cfg = ByteLMConfig(hidden=args.hidden, heads=args.heads, layers=args.layers, experts=args.experts, k=args.k,
                       ffn=args.ffn, seq=args.seq, seed=args.seed)
    corpus: Corpus = load_corpus(args.data_root, HELD_OUT_SHARE, max_files=args.max_files)
    logger.info("data: %s", corpus.describe())
    model = build_byte_lm(cfg, W, kind="replicated").to(device)
    params = split_params_into_different_moe_groups_for_optimizer(
        {"params": [p for p in model.parameters()], "name": "parameters"})
    engine, _opt, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    configured = configure_replication(engine)
    replication = model.moe_layers()[0].replication
    logger.info("%d ReplicatedMoE layers, moe_replication=%s", configured, replication.model_dump())
    if args.check_exact_every and not replication.enabled:
        raise ValueError("--check-exact-every compares replication on with off: it needs an enabled moe_replication "
                         "section (not --no-replication)")
    group = model.moe_layers()[0].deepspeed_moe.ep_group
    observer = RoutingObserver(model.moe_layers(), group)

    windows, _docs = corpus.held_out_windows(args.heldout_seqs, args.seq, seed=args.seed)
    before = heldout_loss(engine, windows, args.eval_batch, observer, None, W, device)
    logger.info("held-out loss before training: %.4f nats/byte", before["loss"])

    recorder = TraceRecorder(k=cfg.k, source=f"train_lm training steps, E={cfg.experts}, W={W}")
    data = corpus.train_batches(batch, args.seq, seed=args.seed * 7919 + rank)
    history: List[Dict] = []
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, desc="train", dynamic_ncols=True)
    engine.train()
    t_train = time.perf_counter()

    def train_step(x: torch.Tensor) -> torch.Tensor:
        logits = engine(x[:, :-1])
        lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        engine.backward(lm_loss + args.aux_loss_coef * model.l_aux)
        engine.step()
        return lm_loss

    checks: List[Dict] = []
    for step in range(args.steps):
        x = next(data).to(device)
        check = None
        if args.check_exact_every and step % args.check_exact_every == 0:
            check = exact_check(engine.module, x, args.aux_loss_coef)
        lm_loss, step_ms = timed(functools.partial(train_step, x))
        if check is not None:
            # The step's own forward must have computed what the check's replicated forward did.
            differs = float(float(lm_loss.detach()) != check["lm_loss_rep"])
            worst = torch.tensor([check["loss_rel_diff"], check["l_aux_rel_diff"], check["grad_rel_diff_max"],
                                  check["replicas_active"], differs], dtype=torch.float64)
            worst = all_reduce(worst, dist.ReduceOp.MAX)
            checks.append(dict(step=step, loss_rel_diff=float(worst[0]), l_aux_rel_diff=float(worst[1]),
                               grad_rel_diff_max=float(worst[2]), replicas_active=int(worst[3]),
                               same_as_step=not bool(worst[4])))
            logger.info("exact check at step %d: loss rel diff %.2e, l_aux rel diff %.2e, grad rel diff (max over "
                        "parameters) %.2e, %d replicas, step forward identical: %s", step, *worst[:3].tolist(),
                        int(worst[3]), not bool(worst[4]))
        seen = observer.take(W)
        for j, c in enumerate(seen["counts_LE"]):
            recorder.record(j, c)
        reduced = torch.tensor([float(lm_loss.detach()), float(model.l_aux.detach())], dtype=torch.float64)
        reduced = all_reduce(reduced)
        reduced /= world
        tokens_per_s = world * batch * args.seq / (step_ms / 1e3)
        history.append(dict(step=step, loss=float(reduced[0]), l_aux=float(reduced[1]), tokens_per_s=tokens_per_s,
                            balancedness=seen["balancedness"], replicas=seen["replicas"]))
        if bar is not None:
            bar.set_postfix(loss=f"{reduced[0]:.3f}", tok_s=f"{tokens_per_s:.0f}", bal=f"{seen['balancedness']:.2f}",
                            replicas=seen["replicas"], refresh=False)
            bar.update(1)
        if args.log_every and (step + 1) % args.log_every == 0:
            logger.info("step %d: loss %.4f, l_aux %.4f, %.0f tokens/s, balancedness %.3f, replicas %d", step + 1,
                        reduced[0], reduced[1], tokens_per_s, seen["balancedness"], seen["replicas"])
    train_seconds = time.perf_counter() - t_train
    if bar is not None:
        bar.close()

    held_recorder = TraceRecorder(k=cfg.k, source=f"train_lm held-out evaluation, E={cfg.experts}, W={W}")
    after = heldout_loss(engine, windows, args.eval_batch, observer, held_recorder, W, device)
    logger.info("held-out loss after %d steps: %.4f nats/byte (before: %.4f); balancedness %.3f, up to %d replicas",
                args.steps, after["loss"], before["loss"], after["balancedness"], after["replicas"])
    observer.remove()

    os.makedirs(args.out, exist_ok=True)
    engine.save_checkpoint(os.path.join(args.out, "checkpoint"), tag=f"step{args.steps}")
    full = full_state_dict(model, W, group)
    if rank != 0:
        dist.barrier()
        return None
    files = dict(checkpoint="checkpoint", model="model_full.pt", trace_train="trace_train.json",
                 trace_heldout="trace_heldout.json", summary="summary.json")
    torch.save({"config": cfg.to_dict(), "state_dict": full}, os.path.join(args.out, files["model"]))
    recorder.save(os.path.join(args.out, files["trace_train"]))
    held_recorder.save(os.path.join(args.out, files["trace_heldout"]))
    tail = history[-20:]
    summary = dict(
        model=cfg.to_dict(), world_size=world, ep_size=W, batch_per_rank=batch, steps=args.steps,
        aux_loss_coef=args.aux_loss_coef, replication=replication.model_dump(), data=corpus.describe(),
        heldout=dict(windows=int(windows.shape[0]), seq=args.seq, loss_before=before["loss"],
                     loss_after=after["loss"], bits_per_byte_before=before["loss"] / math.log(2),
                     bits_per_byte_after=after["loss"] / math.log(2), balancedness_after=after["balancedness"],
                     replicas_after=after["replicas"]),
        train_loss_last20=float(np.mean([h["loss"] for h in tail])),
        tokens_per_s_median=float(np.median([h["tokens_per_s"] for h in history])) if history else 0.0,
        train_seconds=round(train_seconds, 1), seconds=round(time.perf_counter() - t_start, 1),
        files=files, history=history, args=vars(args))
    if args.check_exact_every:
        summary["exact_check"] = checks
        summary["exact_check_max"] = {key: max(c[key] for c in checks) for key in
                                      ("loss_rel_diff", "l_aux_rel_diff", "grad_rel_diff_max")} if checks else {}
        summary["exact_check_note"] = (
            "every exact_check_every-th step: before the step, two extra forwards + autograd.grad on the same weights "
            "and batch (replication as configured, then the stock layer); max over ranks; replication state and "
            "random state restored, same_as_step: the step's own LM loss equalled the check's replicated one bitwise")
    with open(os.path.join(args.out, files["summary"]), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    logger.info("wrote %s: %s", args.out, ", ".join(files.values()))
    dist.barrier()
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                    default="configs/train_demo.json", help="DeepSpeed JSON (optimizer, precision, moe_replication)")
    ap.add_argument("--out", required=True, help="folder for the checkpoint, traces and summary.json")
    ap.add_argument("--no-replication", action="store_true", help="drop the config's moe_replication section")
    ap.add_argument("--aux-loss-coef", type=float, default=0.01,
                    help="weight of the MoE load-balancing loss (0 = none: the routing balances less)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=None, help="sequences per rank (default: the config's "
                                                            "train_micro_batch_size_per_gpu)")
    ap.add_argument("--seq", type=int, default=128, help="bytes per sequence")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4, help="transformer blocks, each with an MoE layer")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("-k", type=int, default=1, help="experts per token")
    ap.add_argument("--ffn", type=int, default=256, help="hidden size of each expert")
    ap.add_argument("--ep-size", type=int, default=None, help="expert-parallel ranks (default: all)")
    ap.add_argument("--heldout-seqs", type=int, default=128, help="held-out windows scored before and after")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--data-root", default=None, help="folder of .py files (default: this Python's stdlib)")
    ap.add_argument("--max-files", type=int, default=None, help="read only the first files (sorted paths)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--check-exact-every", type=int, default=0, metavar="N",
                    help="every N-th step, compare the loss and every gradient with replication on against the stock "
                         "layer on the same weights and batch (extra forwards; summary.json 'exact_check'; 0 = off)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.aux_loss_coef < 0:
        ap.error(f"--aux-loss-coef must be >= 0, got {args.aux_loss_coef}")
    if args.steps < 0 or args.heldout_seqs < 1:
        ap.error("--steps must be >= 0 and --heldout-seqs >= 1")
    if args.check_exact_every < 0:
        ap.error(f"--check-exact-every must be >= 0, got {args.check_exact_every}")
    return args


def main(argv=None) -> int:
    from .runtime import init_distributed

    args = parse_args(argv)
    init_distributed()
    logging.basicConfig(level=logging.INFO if dist.get_rank() == 0 else logging.WARNING,
                        format=f"[rank {dist.get_rank()}] %(asctime)s %(name)s: %(message)s")
    summary = train(args)
    if summary is not None:
        logger.info("held-out loss %.4f -> %.4f nats/byte in %.0f s (%d steps, %.0f tokens/s median)",
                    summary["heldout"]["loss_before"], summary["heldout"]["loss_after"], summary["seconds"],
                    summary["steps"], summary["tokens_per_s_median"])
    return 0
