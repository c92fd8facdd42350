"""Benchmark workloads: which expert each token goes to, per MoE layer and batch, and tokens that
make the model's own gates route that way.

A workload gives, for batch ``b``, the target share of tokens per expert in each layer
(``shares(b) -> [L, E]``), then ``assign(...)`` draws each token's expert per layer and
``steer_tokens(...)`` builds hidden states whose routing through each layer's (unchanged) gate
follows those choices: a token bound for expert ``e`` of layer ``l`` gets ``strength`` along the
unit direction of layer ``l``'s gate row ``e``. Gate rows of different layers are independent
random vectors, so the components of different layers barely disturb each other.

Kinds:
- ``zipf``: share of the r-th hottest expert proportional to 1 / r**exponent; which expert is
  r-th hottest is a fixed random permutation per layer (stationary: history predicts well).
- ``drift``: as ``zipf``, but every ``drift_every`` batches the hot experts move to the next expert id.
- ``switch``: as ``zipf``, but the hot experts jump to the other half of the experts every batch.
- ``trace``: the shares of a recorded trace (``traces.py``), batch ``b`` -> trace batch ``b mod B``.

``correlation`` (rho) links consecutive layers token by token: with probability rho a token takes,
at layer l, the expert of the same popularity rank as its expert at layer l - 1; otherwise it draws
afresh. The marginal shares are unchanged; rho = 1 makes a token's whole path predictable from
its first choice (what lookahead predictors exploit).

Legend: B batches, L MoE layers, E experts, T tokens on this rank, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

__all__ = ["Workload", "KINDS", "zipf_shares", "assign", "steer_tokens"]

KINDS = ("zipf", "drift", "switch", "trace")


def zipf_shares(num_experts: int, exponent: float) -> np.ndarray:
    """[E] shares of the experts ranked by popularity: proportional to 1 / r**exponent, r = 1..E."""
    if exponent < 0:
        raise ValueError(f"zipf exponent must be >= 0, got {exponent}")
    w = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** exponent
    return w / w.sum()


@dataclass(frozen=True)
class Workload:
    """A routing workload over ``layers`` MoE layers of ``experts`` experts each."""

    kind: str
    layers: int
    experts: int
    exponent: float = 1.2
    correlation: float = 0.0
    drift_every: int = 4
    seed: int = 0
    trace_counts_BLE: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"--workload: unknown kind {self.kind!r}; choose from {list(KINDS)}")
        if not 0.0 <= self.correlation <= 1.0:
            raise ValueError(f"--correlation must lie in [0, 1], got {self.correlation}")
        if self.drift_every < 1:
            raise ValueError(f"--drift-every must be >= 1, got {self.drift_every}")
        if self.kind == "trace":
            c = self.trace_counts_BLE
            if c is None or c.ndim != 3 or c.shape[1:] != (self.layers, self.experts):
                got = None if c is None else tuple(c.shape)
                raise ValueError(f"--trace: counts of shape [B, L={self.layers}, E={self.experts}] needed, got {got}")

    def _perm_LE(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        return np.stack([rng.permutation(self.experts) for _ in range(self.layers)])

    def shares(self, batch: int) -> np.ndarray:
        """[L, E] target share of tokens per expert at batch ``batch`` (rows sum to 1)."""
        if self.kind == "trace":
            c = self.trace_counts_BLE[batch % self.trace_counts_BLE.shape[0]].astype(np.float64)
            tot = c.sum(axis=1, keepdims=True)
            return np.where(tot > 0, c / np.maximum(tot, 1e-300), 1.0 / self.experts)
        E = self.experts
        shift = {"zipf": 0, "drift": batch // self.drift_every, "switch": (batch % 2) * (E // 2)}[self.kind]
        expert_of_rank_LR = (self._perm_LE() + shift) % E
        out = np.zeros((self.layers, E))
        z = zipf_shares(E, self.exponent)
        for layer in range(self.layers):
            out[layer, expert_of_rank_LR[layer]] = z
        return out


def assign(shares_LE: np.ndarray, tokens: int, correlation: float, seed: int) -> np.ndarray:
    """[T, L] expert of each token in each layer, drawn from ``shares_LE`` with layer-to-layer
    correlation ``correlation`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    L, E = shares_LE.shape
    # Experts of each layer ordered by popularity: "same rank" links consecutive layers.
    order_LE = np.argsort(-shares_LE, axis=1, kind="stable")
    rank_of_LE = np.argsort(order_LE, axis=1)
    out = np.empty((tokens, L), dtype=np.int64)
    for layer in range(L):
        fresh = rng.choice(E, size=tokens, p=shares_LE[layer])
        if layer and correlation > 0:
            follow = rng.random(tokens) < correlation
            same_rank = order_LE[layer, rank_of_LE[layer - 1, out[:, layer - 1]]]
            fresh = np.where(follow, same_rank, fresh)
        out[:, layer] = fresh
    return out


def steer_tokens(experts_TL: np.ndarray, gate_dirs_LEH: torch.Tensor, strength: float, noise: float,
                 seed: int) -> torch.Tensor:
    """[T, H] hidden states: Gaussian noise (std ``noise``) plus ``strength`` times the unit gate
    direction of each token's expert in every layer."""
    L, E, H = gate_dirs_LEH.shape
    g = torch.Generator().manual_seed(seed)
    x = noise * torch.randn(experts_TL.shape[0], H, generator=g)
    idx = torch.from_numpy(experts_TL)
    for layer in range(L):
        x += strength * gate_dirs_LEH[layer, idx[:, layer]]
    return x
