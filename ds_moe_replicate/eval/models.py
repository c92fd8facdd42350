"""Models for the harness: ``tiny-switch`` (built in), or a transformers id / local folder.

``tiny-switch`` is a small SwitchTransformers configuration (random weights, 8 experts, sparse
every other layer, as google/switch-base-8 is laid out) so everything runs offline on CPU. A
local folder laid out as on the hub (``config.json``, ``model.safetensors`` or
``pytorch_model.bin``, tokenizer files) loads with ``from_pretrained``; without tokenizer files
the harness falls back to a word-hash tokenizer.

Legend: B batch, S sequence, V vocabulary, C classes.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

from .tasks import Example, HashTokenizer

__all__ = ["TINY_SWITCH", "tiny_switch_config", "load_model", "collate", "class_logits", "model_logits"]

TINY_SWITCH = "tiny-switch"


def tiny_switch_config():
    from transformers import SwitchTransformersConfig

    return SwitchTransformersConfig(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=6, num_decoder_layers=2,
                                    num_heads=4, num_experts=8, expert_capacity=64, encoder_sparse_step=2,
                                    decoder_sparse_step=2, dropout_rate=0.0, router_jitter_noise=0.0,
                                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def load_model(name: str, seed: int = 0) -> Tuple[nn.Module, object]:
    """(model in fp32 eval mode, tokenizer). The same weights on every rank."""
    import transformers as tr

    torch.manual_seed(seed)
    if name == TINY_SWITCH:
        model = tr.SwitchTransformersForConditionalGeneration(tiny_switch_config())
        return model.float().eval(), HashTokenizer(model.config.vocab_size)
    config = tr.AutoConfig.from_pretrained(name)
    cls = tr.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else tr.AutoModelForCausalLM
    model = cls.from_pretrained(name, dtype=torch.float32)
    try:
        tokenizer = tr.AutoTokenizer.from_pretrained(name)
    except Exception:  # noqa: BLE001 - a folder without tokenizer files (tests, tiny configs)
        tokenizer = HashTokenizer(model.config.vocab_size)
    return model.eval(), tokenizer


def collate(batch: Sequence[Example], pad_id: int = 0):
    """input_ids [B, S] (right padded), attention_mask [B, S], labels [B]."""
    S = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), S), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        mask[i, :len(e.ids)] = 1
    return ids, mask, torch.tensor([e.label for e in batch])


def model_logits(model, ids: torch.Tensor, mask: torch.Tensor, output_router_logits: bool = False, config=None):
    """The model's output for a batch (``model`` may be a DeepSpeed engine: pass ``config``);
    encoder-decoder models get one decoder start token."""
    cfg = config if config is not None else model.config
    kw = dict(input_ids=ids, attention_mask=mask)
    if output_router_logits:
        kw["output_router_logits"] = True
    if getattr(cfg, "is_encoder_decoder", False):
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else 0
        kw["decoder_input_ids"] = torch.full((ids.shape[0], 1), start, dtype=torch.long)
    return model(**kw)


def class_logits(model: nn.Module, out, mask: torch.Tensor, label_ids: List[int]) -> torch.Tensor:
    """[B, C] logits of the label tokens at the answer position."""
    logits = out.logits
    if getattr(model.config, "is_encoder_decoder", False):
        at = logits[:, 0]
    else:
        at = logits[torch.arange(logits.shape[0]), mask.sum(dim=1) - 1]
    return at[:, label_ids].float()


def answer_logits(model: nn.Module, out, mask: torch.Tensor) -> torch.Tensor:
    """[B, V] full-vocabulary logits at the answer position (what max_abs_logit_diff compares)."""
    logits = out.logits
    if getattr(model.config, "is_encoder_decoder", False):
        return logits[:, 0].float()
    return logits[torch.arange(logits.shape[0]), mask.sum(dim=1) - 1].float()
