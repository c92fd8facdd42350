"""The ``"learned"`` predictor: every MoE layer's expert loads for a batch, predicted from the
batch's token embeddings by a small model distilled from the model's own routers.

Like the seed paper's predictor it sees a batch before any MoE layer runs; unlike it, it only
decides where replicas live: tokens are still routed by the model's gates, so a wrong guess costs
speed, never accuracy.

Legend: N recorded tokens, T tokens, H hidden, L MoE layers (in execution order), E experts,
K routes per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RouterDistiller", "RouterRecord", "HeldOutAgreement", "record_router_outputs", "held_out_documents",
           "agreement_on", "train_distiller"]


class RouterDistiller(nn.Module):
    """A shared MLP trunk over token embeddings and one expert-logit head per MoE layer."""

    def __init__(self, hidden: int, num_layers: int, num_experts: int, k: int = 1, width: int = 128) -> None:
        super().__init__()
        self.hidden, self.num_layers, self.num_experts, self.k, self.width = hidden, num_layers, num_experts, k, width
        self.trunk = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, width), nn.GELU())
        self.heads = nn.Linear(width, num_layers * num_experts)

    def forward(self, emb_TH: torch.Tensor) -> torch.Tensor:
        """[T, L, E] expert logits of every layer."""
        return self.heads(self.trunk(emb_TH)).view(-1, self.num_layers, self.num_experts)

    @torch.no_grad()
    def predict_counts(self, emb_TH: torch.Tensor) -> torch.Tensor:
        """int64 [L, E] predicted routes per expert (each token's top-k experts per layer)."""
        logits = self(emb_TH.float())
        top = logits.topk(self.k, dim=-1).indices  # [T, L, K]
        counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64, device=emb_TH.device)
        layer = torch.arange(self.num_layers, device=emb_TH.device).view(1, -1, 1).expand_as(top)
        counts.index_put_((layer.reshape(-1), top.reshape(-1)), torch.ones_like(top.reshape(-1)), accumulate=True)
        return counts

    def save(self, path: str) -> None:
        torch.save({"config": dict(hidden=self.hidden, num_layers=self.num_layers, num_experts=self.num_experts,
                                   k=self.k, width=self.width), "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str, map_location="cpu") -> "RouterDistiller":
        try:
            blob = torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"moe_replication.learned_path: no predictor file at {path!r}; "
                                    "make one with launch/train_predictor.py") from None
        model = cls(**blob["config"])
        model.load_state_dict(blob["state_dict"])
        return model.eval()


@dataclass
class RouterRecord:
    """Recorded routing: per token, its embedding and its top-k experts in every MoE layer, and
    (when known) its token id and the document it came from.

    Attributes:
        emb_NH: float [N, H] token embeddings (the ``entry`` module's output).
        experts_NLK: int64 [N, L, K] experts each layer's gate chose (-1: route not taken).
        token_N: int64 [N] token ids, or None when the batches were not integer ids.
        doc_N: int64 [N] document of each token, or None.
    """

    emb_NH: torch.Tensor
    experts_NLK: torch.Tensor
    token_N: Optional[torch.Tensor] = None
    doc_N: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class HeldOutAgreement:
    """How often the distilled predictor's top-1 expert is the router's first choice, on tokens
    of documents it was not trained on.

    Attributes:
        agreement_L: per layer, over every held-out token.
        unseen_agreement_L: per layer, over held-out tokens whose token id never occurs in the
            training documents (NaN when there is none): agreement that cannot be memorised.
        held_out_tokens, unseen_tokens: how many tokens each figure is over.
        train_documents, held_out_documents: documents on each side.
    """

    agreement_L: List[float]
    unseen_agreement_L: List[float]
    held_out_tokens: int
    unseen_tokens: int
    train_documents: int
    held_out_documents: int


def record_router_outputs(model: nn.Module, entry: nn.Module, moe_layers: List[nn.Module],
                          batches: Iterable[torch.Tensor], documents: Optional[Iterable[torch.Tensor]] = None
                          ) -> RouterRecord:
    """Run ``model`` on ``batches`` and record, per token, its embedding (``entry``'s output) and
    the experts every layer's gate chose (``moe_layers`` in execution order: any layer with
    ``deepspeed_moe.gate``). Runs under no_grad; the model is left as it was.

    Args:
        batches: model inputs; integer [B, S] token ids also give ``token_N``.
        documents: optional int64 [B] document of each sequence, one tensor per batch; by
            default every sequence is its own document (numbered across batches).

    Returns:
        The ``RouterRecord``.
    """
    from .gating import route

    embs: List[torch.Tensor] = []
    chosen: Dict[int, List[torch.Tensor]] = {i: [] for i in range(len(moe_layers))}
    tokens: List[torch.Tensor] = []
    docs: List[torch.Tensor] = []

    def on_entry(_m, _i, out):
        out = out[0] if isinstance(out, tuple) else out
        embs.append(out.detach().reshape(-1, out.shape[-1]).cpu())

    def on_layer(index: int):
        def hook(m, inputs, _out):
            x = inputs[0].detach()
            gate = m.deepspeed_moe.gate
            chosen[index].append(route(gate, x.reshape(-1, x.shape[-1])).expert_TK.cpu())
        return hook

    handles = [entry.register_forward_hook(on_entry)]
    handles += [layer.register_forward_hook(on_layer(i)) for i, layer in enumerate(moe_layers)]
    doc_iter = iter(documents) if documents is not None else None
    next_doc = 0
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
                if batch.dtype in (torch.int64, torch.int32) and batch.dim() == 2:
                    tokens.append(batch.reshape(-1).cpu().to(torch.int64))
                    seq_doc = next(doc_iter).cpu().to(torch.int64) if doc_iter is not None else \
                        torch.arange(next_doc, next_doc + batch.shape[0])
                    next_doc += batch.shape[0]
                    docs.append(seq_doc.repeat_interleave(batch.shape[1]))
    finally:
        for h in handles:
            h.remove()
    experts = torch.stack([torch.cat(chosen[i]) for i in range(len(moe_layers))], dim=1)
    emb = torch.cat(embs)
    whole = bool(tokens) and sum(t.numel() for t in tokens) == emb.shape[0]
    return RouterRecord(emb, experts, torch.cat(tokens) if whole else None, torch.cat(docs) if whole else None)


def held_out_documents(doc_N: torch.Tensor, every: int = 10) -> torch.Tensor:
    """bool [N]: tokens of every ``every``-th distinct document (sorted ids, the last of each group
    of ``every``) — a fixed split by document; at least one document on each side when there are two."""
    ids = torch.unique(doc_N)
    held_ids = ids[every - 1::every] if ids.numel() >= every else ids[-1:]
    if held_ids.numel() == ids.numel():
        raise ValueError("a split by document needs at least two documents")
    return torch.isin(doc_N, held_ids)


def agreement_on(model: RouterDistiller, record: RouterRecord, held_N: torch.Tensor) -> HeldOutAgreement:
    """``HeldOutAgreement`` of ``model`` on the tokens ``held_N`` of ``record`` (trained on the others)."""
    with torch.no_grad():
        top1_NL = model(record.emb_NH[held_N]).argmax(dim=-1)
    hit_NL = (top1_NL == record.experts_NLK[held_N, :, 0]).float()
    unseen_N = torch.zeros(int(held_N.sum()), dtype=torch.bool)
    if record.token_N is not None:
        unseen_N = ~torch.isin(record.token_N[held_N], record.token_N[~held_N])
    docs = record.doc_N if record.doc_N is not None else torch.zeros(0)
    return HeldOutAgreement(
        agreement_L=hit_NL.mean(dim=0).tolist(),
        unseen_agreement_L=hit_NL[unseen_N].mean(dim=0).tolist() if unseen_N.any()
        else [float("nan")] * hit_NL.shape[1],
        held_out_tokens=int(held_N.sum()), unseen_tokens=int(unseen_N.sum()),
        train_documents=int(torch.unique(docs[~held_N]).numel()) if docs.numel() else 0,
        held_out_documents=int(torch.unique(docs[held_N]).numel()) if docs.numel() else 0)


def train_distiller(record: RouterRecord, num_experts: int, epochs: int = 20, lr: float = 3e-3, width: int = 128,
                    batch: int = 512, seed: int = 0, held_out_N: Optional[torch.Tensor] = None
                    ) -> Tuple[RouterDistiller, HeldOutAgreement]:
    """Fit a ``RouterDistiller`` to recorded routing (cross-entropy to each route's expert).

    Held out by document, never by position: tokens of one document are all on one side, so
    agreement is measured on text the predictor never saw (``held_out_N``, or by default every
    tenth document of ``record.doc_N``, see ``held_out_documents``).

    Returns:
        (the model in eval mode, its ``HeldOutAgreement`` on the held-out tokens).
    """
    torch.manual_seed(seed)
    N, H = record.emb_NH.shape
    L, K = record.experts_NLK.shape[1:]
    if held_out_N is None:
        if record.doc_N is None:
            raise ValueError("train_distiller: the record has no documents; pass held_out_N")
        held_out_N = held_out_documents(record.doc_N)
    model = RouterDistiller(H, L, num_experts, K, width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    target = record.experts_NLK.clamp_min(0)
    train = (~held_out_N).nonzero().reshape(-1)
    for _ in range(epochs):
        for idx in train[torch.randperm(train.numel())].split(batch):
            logits = model(record.emb_NH[idx])  # [B, L, E]
            loss = sum(F.cross_entropy(logits.reshape(-1, num_experts), target[idx, :, j].reshape(-1))
                       for j in range(K))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, agreement_on(model, record, held_out_N)
