"""Predictors on real routing: the trained byte-level model's held-out traffic, replayed.

    python -m ds_moe_replicate.bench.real_predictors --run RUN_DIR --out DIR

``RUN_DIR`` is a ``launch/train.py`` run. One process, no launcher: the model runs with every
expert local (``byte_lm.LocalMoE``), which routes exactly as the expert-parallel layers do.

1. The ``"learned"`` predictor (``learned.RouterDistiller``) is distilled from the model's routers
   on windows of *training* documents and scored on windows of *held-out* documents (top-1
   agreement, also on held-out bytes whose value never occurs in the training windows).
2. Held-out windows are run as a stream of batches; each batch's routes per expert of every layer
   are recorded (``trace_heldout_replay.json``, the trace format) with the learned predictor's
   prediction for the same batch (``trace_learned_prediction.json``).
3. On that trace, for emulated expert-parallel sizes W (the trace's own E), every predictor is
   replayed through the library's own code: ``EmaPredictor`` / ``WindowPredictor`` re-planned
   every ``replan_interval`` batches from the batches before, ``learned`` planning each batch
   from its own prediction, ``oracle`` from the batch's real counts, and ``none`` (DeepSpeed's
   home placement). Each plan is ``plan_replicas(prediction, W, S)``; the batch's real counts are
   split over the plan's copies (``split_loads``) and the realised ``balancedness`` taken, with
   the prediction's L1 error and hot-expert recall (``layer.prediction_quality``).

Legend: B batches, L MoE layers, E experts, W emulated ranks, S replica slots per rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Dict, Optional

import numpy as np
import torch

from ..byte_lm import ByteLMConfig, build_byte_lm, load_full_state_dict
from ..config import ReplicationConfig
from ..hooks import prediction_quality
from ..learned import RouterRecord, record_router_outputs, train_distiller
from ..planner import balancedness, home_plan, plan_replicas, split_loads
from ..predictor import (
    AHEAD,
    HISTORY,
    NOW,
    PREDICTORS,
    EmaPredictor,
    LearnedPredictor,
    OraclePredictor,
    WindowPredictor,
    make_predictor,
    name_of,
)
from ..stdlib_text import load_corpus
from ..traces import Trace, save_trace
from .common import markdown_table

NONE = "none"  # DeepSpeed's placement, no replication
# Predictors a trace can replay (lookahead needs the model's hidden states); ``learned`` replays
# its recorded prediction.
REPLAYED = (NONE,) + tuple(name_of(c) for c in (EmaPredictor, WindowPredictor, LearnedPredictor, OraclePredictor))


def _realised(counts_LE: np.ndarray, plan, W: int) -> np.ndarray:
    """[L] balancedness of the real counts split over ``plan``'s copies."""
    slot_LP = split_loads(counts_LE.astype(np.float64), plan.phy2log, W).numpy()
    return balancedness(slot_LP.reshape(counts_LE.shape[0], W, -1).sum(axis=2)).numpy()


def replay(counts_BLE: np.ndarray, W: int, slots: int, predictor: str, replan_interval: int = 4,
           ema_decay: float = 0.5, window: int = 8, predicted_BLE: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Replay one predictor on a trace at W emulated ranks.

    Args:
        counts_BLE: real routes per expert, per batch and layer.
        W, slots: emulated expert-parallel size and replica slots per rank.
        predictor: one of ``REPLAYED``.
        replan_interval, ema_decay, window: the history predictors' ``moe_replication`` fields.
        predicted_BLE: the learned predictor's per-batch prediction (``"learned"`` only).

    Returns:
        Means over batches and layers: ``balancedness``, ``l1``, ``hot_recall`` (NaN where no
        prediction exists, e.g. ``none``), and ``min_balancedness``.
    """
    B, L, E = counts_BLE.shape
    source = None if predictor == NONE else PREDICTORS[predictor].source
    history = [make_predictor(predictor, ema_decay=ema_decay, window=window) for _ in range(L)] \
        if source == HISTORY else []
    plan, pred_LE = home_plan(counts_BLE[0], W, slots), None
    bal, l1, recall = [], [], []
    for b in range(B):
        actual = counts_BLE[b]
        if source == HISTORY and b > 0 and b % replan_interval == 0:
            pred_LE = np.stack([h.predict() for h in history])
            plan = plan_replicas(pred_LE, W, slots)
        elif source == AHEAD:
            pred_LE = predicted_BLE[b].astype(np.float64)
            plan = plan_replicas(pred_LE, W, slots)
        elif source == NOW:
            pred_LE = actual.astype(np.float64)
            plan = plan_replicas(pred_LE, W, slots)
        bal.extend(_realised(actual, plan, W).tolist())
        for j in range(L):
            q = prediction_quality(None if pred_LE is None else pred_LE[j], actual[j], W)
            l1.append(q[0])
            recall.append(q[1])
        for j, h in enumerate(history):
            h.observe(actual[j])
    nan_mean = lambda v: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan")  # noqa: E731
    return dict(balancedness=float(np.mean(bal)), min_balancedness=float(np.min(bal)), l1=nan_mean(l1),
                hot_recall=nan_mean(recall))


def record_heldout(run: str, batches: int, batch: int, train_windows: int, epochs: int, seed: int = 0):
    """Distil the learned predictor and record the held-out stream (steps 1-2 of the docstring)."""
    blob = torch.load(os.path.join(run, "model_full.pt"), map_location="cpu", weights_only=True)
    cfg = ByteLMConfig(**blob["config"])
    model = build_byte_lm(cfg, kind="local")
    load_full_state_dict(model, blob["state_dict"], 0, 1)
    model.eval()
    corpus = load_corpus()
    tw, td = corpus.train_windows(train_windows, cfg.seq, seed=seed + 11)
    hw, hd = corpus.held_out_windows(batches * batch, cfg.seq, seed=seed + 12)
    tw, hw = tw[:, :-1], hw[:, :-1]
    split = lambda x: list(x.split(batch))  # noqa: E731
    train_rec = record_router_outputs(model, model.embed, model.moe_layers(), split(tw), split(td))
    held_rec = record_router_outputs(model, model.embed, model.moe_layers(), split(hw),
                                     split(hd + len(corpus.train)))
    record = RouterRecord(torch.cat([train_rec.emb_NH, held_rec.emb_NH]),
                          torch.cat([train_rec.experts_NLK, held_rec.experts_NLK]),
                          torch.cat([train_rec.token_N, held_rec.token_N]), torch.cat([train_rec.doc_N, held_rec.doc_N]))
    held_N = record.doc_N >= len(corpus.train)
    distiller, agreement = train_distiller(record, cfg.experts, epochs=epochs, held_out_N=held_N, seed=seed)
    # The held-out stream: real counts per batch and layer, and the learned prediction of each batch.
    T = batch * cfg.seq
    experts_BTLK = held_rec.experts_NLK.view(batches, T, cfg.layers, -1)
    counts_BLE = np.stack([[np.bincount(experts_BTLK[b, :, j].reshape(-1).numpy(), minlength=cfg.experts)
                            for j in range(cfg.layers)] for b in range(batches)]).astype(np.int64)
    emb_BTH = held_rec.emb_NH.view(batches, T, -1)
    predicted_BLE = np.stack([distiller.predict_counts(emb_BTH[b]).numpy() for b in range(batches)])
    return cfg, corpus, counts_BLE, predicted_BLE, agreement


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a launch/train.py output folder")
    ap.add_argument("--out", required=True, help="folder for predictors.json and the two traces")
    ap.add_argument("--deepspeed_config", default="configs/train_demo.json",
                    help="its moe_replication section gives S, replan_interval, ema_decay, window")
    ap.add_argument("--ranks", default="2,4,8", help="emulated expert-parallel sizes W")
    ap.add_argument("--batches", type=int, default=48, help="held-out batches replayed")
    ap.add_argument("--batch", type=int, default=16, help="windows per batch (x the model's seq tokens)")
    ap.add_argument("--train-windows", type=int, default=512, help="training windows the predictor is distilled on")
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args(argv)
    rep = ReplicationConfig.from_ds_config(args.deepspeed_config)
    cfg, corpus, counts_BLE, predicted_BLE, agreement = record_heldout(args.run, args.batches, args.batch,
                                                                       args.train_windows, args.epochs)
    os.makedirs(args.out, exist_ok=True)
    save_trace(Trace(counts_BLE, cfg.k, f"byte LM {args.run}, held-out stream, {args.batch}x{cfg.seq} tokens per batch"),
               os.path.join(args.out, "trace_heldout_replay.json"))
    save_trace(Trace(predicted_BLE, cfg.k, "learned predictor's prediction of trace_heldout_replay.json"),
               os.path.join(args.out, "trace_learned_prediction.json"))
    rows = []
    for W in [int(w) for w in args.ranks.split(",") if w]:
        if cfg.experts % W:
            continue
        for name in REPLAYED:
            r = replay(counts_BLE, W, rep.slots_per_rank, name, rep.replan_interval, rep.ema_decay, rep.window,
                       predicted_BLE)
            rows.append(dict(W=W, E=cfg.experts, predictor=name, **r))
    shares = counts_BLE / counts_BLE.sum(axis=2, keepdims=True)
    body = dict(run=args.run, model=cfg.to_dict(), data=corpus.describe(), batches=args.batches,
                tokens_per_batch=args.batch * cfg.seq, slots_per_rank=rep.slots_per_rank,
                replan_interval=rep.replan_interval, ema_decay=rep.ema_decay, window=rep.window,
                hottest_expert_share_mean=float(shares.max(axis=2).mean()),
                learned_agreement=agreement.__dict__, rows=rows)
    with open(os.path.join(args.out, "predictors.json"), "w", encoding="utf-8") as fh:
        json.dump(body, fh, indent=1)
    f = lambda v, p: "-" if isinstance(v, float) and math.isnan(v) else format(v, p)  # noqa: E731
    print(f"Held-out routing of {args.run}: {args.batches} batches of {args.batch}x{cfg.seq} bytes, L={cfg.layers}, "
          f"E={cfg.experts}, k={cfg.k}; hottest expert's share {body['hottest_expert_share_mean']:.1%} (mean over "
          f"batches and layers); S={rep.slots_per_rank}, replan every {rep.replan_interval} batches (ema, window)")
    a = agreement
    print(f"learned predictor: top-1 agreement on {a.held_out_tokens} held-out tokens ({a.held_out_documents} "
          f"documents, trained on {a.train_documents}): " + " / ".join(f"{v:.1%}" for v in a.agreement_L)
          + f"; on the {a.unseen_tokens} tokens whose byte never occurs in training: "
          + " / ".join(f(v, ".1%") for v in a.unseen_agreement_L))
    print(markdown_table(["W", "E", "predictor", "balancedness (mean)", "balancedness (min)", "L1 error", "hot recall"],
                         [[r["W"], r["E"], r["predictor"], f"{r['balancedness']:.3f}", f"{r['min_balancedness']:.3f}",
                           f(r["l1"], ".3f"), f(r["hot_recall"], ".2f")] for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
