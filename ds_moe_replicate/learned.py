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
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RouterDistiller", "RouterRecord", "record_router_outputs", "train_distiller"]


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
    """Recorded routing: token embeddings and each token's top-k experts in every MoE layer."""

    emb_NH: torch.Tensor
    experts_NLK: torch.Tensor


def record_router_outputs(model: nn.Module, entry: nn.Module, moe_layers: List[nn.Module],
                          batches: Iterable[torch.Tensor]) -> RouterRecord:
    """Run ``model`` on ``batches`` and record, per token, its embedding (``entry``'s output) and
    the experts every layer's gate chose (``moe_layers`` in execution order; stock ``MoE`` or
    ``ReplicatedMoE``). Runs under no_grad; the model is left as it was."""
    from .gating import route

    embs: List[torch.Tensor] = []
    chosen: Dict[int, List[torch.Tensor]] = {i: [] for i in range(len(moe_layers))}

    def on_entry(_m, _i, out):
        embs.append((out[0] if isinstance(out, tuple) else out).detach().reshape(-1, out.shape[-1]).cpu())

    def on_layer(index: int):
        def hook(m, inputs, _out):
            x = inputs[0].detach()
            gate = m.deepspeed_moe.gate
            chosen[index].append(route(gate, x.reshape(-1, x.shape[-1])).expert_TK.cpu())
        return hook

    handles = [entry.register_forward_hook(on_entry)]
    handles += [layer.register_forward_hook(on_layer(i)) for i, layer in enumerate(moe_layers)]
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for h in handles:
            h.remove()
    experts = torch.stack([torch.cat(chosen[i]) for i in range(len(moe_layers))], dim=1)
    return RouterRecord(torch.cat(embs), experts)


def train_distiller(record: RouterRecord, num_experts: int, epochs: int = 20, lr: float = 3e-3, width: int = 128,
                    batch: int = 512, seed: int = 0) -> Tuple[RouterDistiller, List[float]]:
    """Fit a ``RouterDistiller`` to recorded routing (cross-entropy to each route's expert).

    A random tenth of the tokens is held out.

    Returns:
        (the model in eval mode, per-layer top-1 agreement with the routers on the held-out tokens).
    """
    torch.manual_seed(seed)
    N, H = record.emb_NH.shape
    L, K = record.experts_NLK.shape[1:]
    model = RouterDistiller(H, L, num_experts, K, width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    target = record.experts_NLK.clamp_min(0)
    order = torch.randperm(N)
    held, train = order[: max(1, N // 10)], order[max(1, N // 10):]
    for _ in range(epochs):
        for idx in train[torch.randperm(train.numel())].split(batch):
            logits = model(record.emb_NH[idx])  # [B, L, E]
            loss = sum(F.cross_entropy(logits.reshape(-1, num_experts), target[idx, :, j].reshape(-1))
                       for j in range(K))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        top1 = model(record.emb_NH[held]).argmax(dim=-1)
        agreement = (top1 == record.experts_NLK[held, :, 0]).float().mean(dim=0).tolist()
    return model, agreement
