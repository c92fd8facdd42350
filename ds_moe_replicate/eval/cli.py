"""Command line of the harness (``python -m ds_moe_replicate.eval`` and ``launch/evaluate.py``).

One process (``python -m``) runs as a world of one rank; under the ``deepspeed`` launcher every
rank runs it and the expert-parallel modes use ``--ep-size`` ranks (default: all of them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .harness import MODES, EvalArgs, markdown_table, run_eval
from .models import TINY_SWITCH
from .tasks import TASKS

__all__ = ["main", "parse_args"]


def parse_args(argv: Optional[List[str]] = None) -> EvalArgs:
    p = argparse.ArgumentParser(prog="python -m ds_moe_replicate.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=TINY_SWITCH,
                   help=f"a transformers id, a local folder laid out as on the hub, or '{TINY_SWITCH}'")
    p.add_argument("--task", default="synthetic", choices=TASKS + ("stdlib",),
                   help="a classification task, or 'stdlib': next-byte prediction on held-out standard-library "
                        "files by a model trained with launch/train.py (--model RUN_DIR)")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--data-dir", help="local GLUE files: <dir>/<task>/{train,validation}.jsonl|json|csv|tsv|parquet")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--ep-size", type=int, help="expert-parallel ranks (default: the world size)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--train-steps", type=int,
                   help=f"fine-tuning steps through the DeepSpeed engine (default: 300 for {TINY_SWITCH}, else 0)")
    p.add_argument("--train-batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-size", type=int, help="use at most this many training examples")
    p.add_argument("--eval-size", type=int, help="evaluate at most this many validation examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   help="DeepSpeed JSON whose 'moe_replication' section configures the replicated mode")
    p.add_argument("--keep-hf-capacity", action="store_true",
                   help="run the baseline with Switch's own per-sequence expert_capacity (drops tokens) "
                        "instead of dropless")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    a = p.parse_args(argv)
    return EvalArgs(model=a.model, task=a.task, out=a.out, data_dir=a.data_dir,
                    modes=[m.strip() for m in a.modes.split(",") if m.strip()], ep_size=a.ep_size,
                    batch_size=a.batch_size, max_len=a.max_len, train_steps=a.train_steps,
                    train_batch_size=a.train_batch_size, lr=a.lr, train_size=a.train_size, eval_size=a.eval_size,
                    seed=a.seed, deepspeed_config=a.deepspeed_config, keep_hf_capacity=a.keep_hf_capacity,
                    progress=not a.no_progress)


def _init_distributed() -> None:
    """A world of one rank when not started by a launcher, then DeepSpeed's comm (gloo on CPU)."""
    if "RANK" not in os.environ:
        from ..testing import free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    from ..distributed import init_distributed

    init_distributed()


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    _init_distributed()
    if args.task == "stdlib":
        from .lm import lm_markdown_table, run_lm_eval

        report = run_lm_eval(args)
        if report is not None:
            print(lm_markdown_table(report))
            print(json.dumps({"retention": report["retention"], "max_abs_logit_diff": report["max_abs_logit_diff"]}))
            sys.stdout.flush()
        return 0
    report = run_eval(args)
    if report is not None:
        print(markdown_table(report))
        print(json.dumps({"retention": report["retention"], "max_abs_logit_diff": report["max_abs_logit_diff"]}))
        sys.stdout.flush()
    return 0
