"""Record router outputs of the built-in Switch-style model on its real expert-parallel ranks and
distill the ``"learned"`` predictor from them.

    deepspeed --num_gpus 2 launch/train_predictor.py --out predictor.pt

Every rank runs the model (replication off: the stock path) on batches of every topic and records
each token's embedding and the experts its routers chose; rank 0 gathers the records, trains a
``RouterDistiller`` and saves it. Point ``moe_replication.learned_path`` at the file.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .learned import HeldOutAgreement, RouterRecord, record_router_outputs, train_distiller
from .tiny_switch import TinySwitch, TinySwitchConfig, build_tiny_switch, topic_tokens

__all__ = ["distill", "main"]

_DOCS_PER_RANK = 1 << 32


def distill(model: TinySwitch, cfg: TinySwitchConfig, out: str, batches: int = 8, batch: int = 4, seq: int = 512,
            topic_share: float = 0.7, epochs: int = 20, device=None) -> Tuple[HeldOutAgreement, float]:
    """Record on every rank, train on rank 0, save to ``out``.

    Every recorded sequence is a document; every tenth is held out (``learned.held_out_documents``).
    Collective: every rank of the default group must call it.

    Returns:
        (agreement with the routers on held-out sequences, seconds).
    """
    t0 = time.perf_counter()
    rank = dist.get_rank() if dist.is_initialized() else 0
    inputs = [topic_tokens(cfg, batch, seq, topic_share, seed=10_000 + 97 * rank + i, topic=i % cfg.topics)
              for i in range(batches)]
    if device is not None:
        inputs = [x.to(device) for x in inputs]
    record = record_router_outputs(model, model.embed, model.moe_layers(), inputs)
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (record.emb_NH, record.experts_NLK, record.token_N, record.doc_N))
        # Each rank numbers its own sequences from 0: keep documents of different ranks apart.
        record = RouterRecord(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                              torch.cat([p[2] for p in parts]),
                              torch.cat([p[3] + r * _DOCS_PER_RANK for r, p in enumerate(parts)]))
    agreement: Optional[HeldOutAgreement] = None
    if rank == 0:
        distiller, agreement = train_distiller(record, cfg.num_experts, epochs=epochs)
        distiller.save(out)
    if dist.is_initialized():
        dist.barrier()
        box = [agreement]
        dist.broadcast_object_list(box, src=0)
        agreement = box[0]
    return agreement, time.perf_counter() - t0


def main(argv=None) -> int:
    from .runtime import device_for_rank, init_distributed
    from .tiny_switch import add_tiny_switch_args

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where to save the predictor (moe_replication.learned_path)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batches", type=int, default=8, help="recorded batches per rank")
    ap.add_argument("--epochs", type=int, default=20)
    add_tiny_switch_args(ap)
    args = ap.parse_args(argv)
    init_distributed()
    cfg = TinySwitchConfig(hidden=args.hidden, ffn=args.ffn, blocks=args.blocks, num_experts=args.experts)
    model = build_tiny_switch(cfg, dist.get_world_size(), replicated=False).to(device_for_rank())
    agreement, seconds = distill(model, cfg, args.out, args.batches, args.batch, args.seq, epochs=args.epochs,
                                 device=device_for_rank())
    if dist.get_rank() == 0:
        per_layer = ", ".join(f"layer {i}: {a:.1%}" for i, a in enumerate(agreement.agreement_L))
        unseen = ", ".join(f"{a:.1%}" for a in agreement.unseen_agreement_L)
        print(f"saved {args.out}: top-1 agreement with the routers on {agreement.held_out_tokens} tokens of "
              f"{agreement.held_out_documents} held-out sequences: {per_layer}; on the {agreement.unseen_tokens} of them "
              f"whose token id never occurs in training: {unseen} ({seconds:.1f} s, {args.batches} batches of "
              f"{args.batch}x{args.seq} tokens per rank)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
