"""Tiny random Hugging Face MoE models and the per-rank bodies of the HF tests (importable by
spawned ranks).

Router weights are drawn with a large spread so that routing is decisive and every expert gets
tokens; a wrong expert, a wrong combine weight or a lost shared expert shows in the logits.
"""

import copy
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

FAMILIES = ("switch", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
VOCAB = 97


@dataclass
class HFComparison:
    """One rank's original model vs the model after ``replace_moe_blocks``."""

    diffs: List[float]                                  # max abs logit diff per step
    losses: List[Tuple[Dict[str, float], Dict[str, float]]]  # (original, replaced) aux losses per step
    recorded: List[Tuple[int, int]]                     # router logits recorded (original, replaced) per step
    held: List[List[int]]                               # original experts matching each local expert
    blocks: int                                         # MoE blocks replaced
    replicated_steps: List[int]                         # steps the replicated path recorded
    corrupted: float                                    # logit diff once a local expert is corrupted
    gate_shared: bool                                   # every block's gate is the router's own weight


def build_tiny(name: str, seed: int = 0) -> nn.Module:
    """A tiny random model of one family, the same on every rank (eval mode, fp32)."""
    import transformers as tr

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    if name == "switch":
        cfg = tr.SwitchTransformersConfig(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                          num_decoder_layers=2, num_heads=4, num_experts=4, expert_capacity=64,
                                          encoder_sparse_step=1, decoder_sparse_step=2, dropout_rate=0.0)
        model = tr.SwitchTransformersForConditionalGeneration(cfg)
    elif name == "mixtral":
        model = tr.MixtralForCausalLM(tr.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2))
    elif name == "qwen2_moe":
        # norm_topk_prob=False (the Qwen2-MoE default): combine weights are the raw probabilities.
        model = tr.Qwen2MoeForCausalLM(tr.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2,
                                                         moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                                         norm_topk_prob=False))
    elif name == "qwen3_moe":
        model = tr.Qwen3MoeForCausalLM(tr.Qwen3MoeConfig(**common, num_experts=8, num_experts_per_tok=3,
                                                         moe_intermediate_size=24, norm_topk_prob=True))
    elif name == "olmoe":
        model = tr.OlmoeForCausalLM(tr.OlmoeConfig(**common, num_experts=4, num_experts_per_tok=2,
                                                   norm_topk_prob=False))
    else:
        raise ValueError(name)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "router" in n or n.endswith("gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 2.0)
            elif "experts" in n or "shared_expert" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def inputs(name: str, seed: int, batch: int = 2, seq: int = 11):
    g = torch.Generator().manual_seed(seed)
    kw = {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)}
    if name == "switch":
        kw["decoder_input_ids"] = torch.randint(0, VOCAB, (batch, 5), generator=g)
    return kw


def aux_losses(out) -> dict:
    return {k: float(v) for k, v in out.items() if k.endswith("loss") and v is not None}


def compare(rank: int, name: str, mode: str, ep_size: int, steps: int = 3):
    """Original model vs the model after replace_moe_blocks, on this rank's own batches.

    Returns an ``HFComparison``: max abs logit diff, the aux-loss pairs, the number of router
    logits recorded by each, the experts this rank holds (as indices into the original's
    experts), and whether a deliberately wrong expert would have been visible.
    """
    from ds_moe_replicate.hf import DeepSpeedMoEBlock, replace_moe_blocks, set_switch_capacity

    base = build_tiny(name)
    if name == "switch":
        set_switch_capacity(base, None)
    model = copy.deepcopy(base)
    names = replace_moe_blocks(model, ep_size=ep_size, mode=mode,
                               replication={"enabled": True, "slots_per_rank": 1, "replan_interval": 1})
    blocks = [m for m in model.modules() if isinstance(m, DeepSpeedMoEBlock)]
    diffs, losses, recorded = [], [], []
    for step in range(steps):
        kw = inputs(name, seed=100 * rank + step, seq=7 + 4 * rank + step)
        with torch.no_grad():
            a = base(**kw, output_router_logits=True)
            b = model(**kw, output_router_logits=True)
        diffs.append((a.logits - b.logits).abs().max().item())
        losses.append((aux_losses(a), aux_losses(b)))
        key = "encoder_router_logits" if name == "switch" else "router_logits"
        recorded.append((len(a[key]), len(b[key])))
    # Which original experts does this rank hold? Match local weights against the original's.
    held = []
    first = dict(base.named_modules())[names[0]]
    block = blocks[0]
    for local in block.moe.deepspeed_moe.experts.deepspeed_experts:
        w = next(local.parameters()).detach()
        if name == "switch":
            cand = [first.experts[f"expert_{e}"].wi.weight for e in range(len(first.experts))]
        else:
            cand = [first.experts.gate_up_proj[e] for e in range(first.experts.gate_up_proj.shape[0])]
        held.append([e for e, c in enumerate(cand) if torch.equal(c.detach(), w)])
    stats = [blk.moe.last_stats for blk in blocks] if mode == "replicated" else []
    # Sensitivity: corrupting one local expert must change the logits.
    with torch.no_grad():
        for p in block.moe.deepspeed_moe.experts.deepspeed_experts[0].parameters():
            p.mul_(1.5)
        kw = inputs(name, seed=100 * rank, seq=7 + 4 * rank)
        corrupted = (base(**kw).logits - model(**kw).logits).abs().max().item()
    return HFComparison(diffs=diffs, losses=losses, recorded=recorded, held=held, blocks=len(names),
                        replicated_steps=[s.step for s in stats if s is not None], corrupted=corrupted,
                        gate_shared=all(blk.gate_weight is (blk.router.classifier.weight if name == "switch"
                                                            else blk.router.weight) for blk in blocks))


def compare_many(rank: int, cases, ep_size: int):
    """``compare`` for several (family, mode) cases in one process (spawning ranks is slow)."""
    return {f"{name}/{mode}": compare(rank, name, mode, ep_size) for name, mode in cases}


def eval_in_process(rank: int, kwargs: dict):
    """``run_eval(EvalArgs(**kwargs))`` inside a ``run_ranks`` world; the report (rank 0) or None."""
    from ds_moe_replicate.eval import EvalArgs, run_eval

    return run_eval(EvalArgs(progress=False, **kwargs))
