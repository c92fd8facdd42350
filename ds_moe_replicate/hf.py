"""Swap the sparse MLP blocks of Hugging Face transformers models for DeepSpeed MoE layers.

``replace_moe_blocks(model, ep_size=W, replication=...)`` replaces every sparse block of a
transformers (5.x) model by a ``DeepSpeedMoEBlock`` that holds a ``ReplicatedMoE`` (or, with
``mode="stock"``, a plain ``deepspeed.moe.layer.MoE``), carrying the router and expert weights.
Each expert-parallel rank keeps only its own experts (rank r: experts r*E_loc .. (r+1)*E_loc-1,
DeepSpeed's home placement); the other experts' weights are released with the HF block.

Families:
- SwitchTransformers (encoder and decoder): router ``classifier`` [E, H], experts a ModuleDict of
  ``wi``/``wo``; top-1 with the raw softmax probability (DeepSpeed's k = 1).
- The fused-expert family (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE, OLMoE): router
  ``weight`` [E, H], ``gate_up_proj`` [E, 2F, H] and ``down_proj`` [E, H, F], SwiGLU.

Semantics. DeepSpeed weights a token's k >= 2 routes by their renormalised probabilities; HF
renormalises only when ``norm_topk_prob`` is set (Mixtral always; Qwen2-MoE and OLMoE default to
off). The block multiplies the layer's output by the ratio of the two normalisers per token, so
both conventions come out exactly; the routing itself (which experts) is never changed. The HF
router module is kept and still called, so ``output_router_logits`` and the model's auxiliary
losses see the same router logits as before (transformers records them with hooks on the router
class). DeepSpeed's own ``l_aux`` and ``exp_counts`` are on ``block.l_aux``/``block.exp_counts``.

Switch's own router drops tokens per *sequence*: an expert takes at most ``expert_capacity``
tokens of each sequence (64 for google/switch-base-*), the rest get a zero MLP output (only the
residual passes). DeepSpeed counts capacity per *batch* (``capacity_factor``). To compare outputs,
run both dropless: ``set_switch_capacity(model, None)`` on the HF model, and ``dropless=True``
here (the default).

Legend: B batch, S sequence, T tokens, H hidden, F expert FFN size, E experts, K routes per token.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .comm import expert_parallel_group, group_rank
from .config import ReplicationConfig
from .layer import ReplicatedMoE

__all__ = ["replace_moe_blocks", "DeepSpeedMoEBlock", "GLUExpert", "find_moe_blocks", "set_switch_capacity",
           "UNLIMITED_CAPACITY"]

# The fused-expert routers whose forward is softmax -> top-k (-> renormalise if norm_topk_prob).
_FUSED_ROUTERS = ("MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "OlmoeTopKRouter")
_SWITCH_BLOCK = "SwitchTransformersSparseMLP"
UNLIMITED_CAPACITY = 2 ** 62


class GLUExpert(nn.Module):
    """One expert of the fused family: ``down(act(x W_gate^T) * x W_up^T)``.

    ``gate_up_proj.weight`` [2F, H] is the HF ``gate_up_proj[e]`` (gate rows first), and
    ``down_proj.weight`` [H, F] is ``down_proj[e]``: the same ``F.linear`` calls as HF.
    """

    def __init__(self, hidden: int, ffn: int, act: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)
        self.act_fn = act

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x_TH).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class DeepSpeedMoEBlock(nn.Module):
    """A HF sparse MLP block computed by a DeepSpeed MoE layer (stock or replicated).

    Attributes:
        router: the HF router module (kept so transformers records its logits; its weight is the
            DeepSpeed gate's weight, the same ``Parameter``).
        moe: ``ReplicatedMoE`` or ``deepspeed.moe.layer.MoE``.
        shared_expert, shared_expert_gate: Qwen2-MoE's always-on expert and its sigmoid gate.
        l_aux, exp_counts: DeepSpeed's load-balancing loss and routes per expert of the last call.
    """

    def __init__(self, router: nn.Module, moe: nn.Module, family: str, k: int, norm_topk_prob: bool,
                 shared_expert: Optional[nn.Module] = None, shared_expert_gate: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.router = router
        self.moe = moe
        self.family = family
        self.k = k
        self.norm_topk_prob = norm_topk_prob
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.l_aux: Optional[torch.Tensor] = None
        self.exp_counts: Optional[torch.Tensor] = None

    @property
    def gate_weight(self) -> torch.Tensor:
        return self.moe.deepspeed_moe.gate.wg.weight

    def _weight_ratio_T(self, x_TH: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-token factor turning DeepSpeed's combine weights into HF's (None when equal).

        DeepSpeed divides the chosen probabilities by their sum s for k >= 2 and not for k = 1;
        HF divides by s when ``norm_topk_prob``. The factor is s_ds / s_hf, in fp32.
        """
        ds_norm = self.k >= 2
        if ds_norm == self.norm_topk_prob:
            return None
        probs_TE = F.softmax(F.linear(x_TH.float(), self.gate_weight.float()), dim=-1)
        s_T = probs_TE.topk(self.k, dim=-1).values.sum(dim=-1, keepdim=True)
        return s_T if ds_norm else 1.0 / s_T

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        # NOTE: the HF router runs for its recorded outputs (router_logits -> aux/z losses);
        # the routing decision used is the DeepSpeed gate's, from the same weight.
        if self.family == "switch":
            self.router(hidden_states)
        else:
            self.router(hidden_states.reshape(-1, shape[-1]))
        out, self.l_aux, self.exp_counts = self.moe(hidden_states)
        x_TH = hidden_states.reshape(-1, shape[-1])
        ratio_T = self._weight_ratio_T(x_TH)
        if ratio_T is not None:
            out = (out.reshape(-1, shape[-1]).float() * ratio_T).to(out.dtype).reshape(shape)
        if self.shared_expert is not None:
            shared = self.shared_expert(x_TH)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x_TH)) * shared
            out = out + shared.reshape(shape)
        return out


def _family(block: nn.Module) -> Optional[str]:
    if type(block).__name__ == _SWITCH_BLOCK:
        return "switch"
    gate = getattr(block, "gate", None)
    experts = getattr(block, "experts", None)
    if type(gate).__name__ in _FUSED_ROUTERS and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
        return "fused"
    return None


def find_moe_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(qualified name, module) of every sparse block ``replace_moe_blocks`` knows how to swap."""
    return [(name, m) for name, m in model.named_modules() if _family(m) is not None]


def set_switch_capacity(model: nn.Module, capacity: Optional[int]) -> int:
    """Set ``expert_capacity`` of every Switch router (None: unlimited, i.e. dropless).

    Returns:
        The number of routers changed.
    """
    n = 0
    for m in model.modules():
        if type(m).__name__ == "SwitchTransformersTop1Router":
            m.expert_capacity = UNLIMITED_CAPACITY if capacity is None else int(capacity)
            n += 1
    return n


def _switch_parts(block: nn.Module):
    router = block.router
    if router.classifier.bias is not None:
        raise NotImplementedError("Switch routers with a bias (router_bias=True) have no DeepSpeed TopKGate "
                                  "equivalent (its wg has no bias)")
    E = router.num_experts
    experts = [block.experts[f"expert_{e}"] for e in range(E)]
    template = copy.deepcopy(experts[0])
    return router, router.classifier.weight, 1, False, template, experts


def _fused_parts(block: nn.Module):
    router, ex = block.gate, block.experts
    for attr, ok in (("is_transposed", False), ("has_bias", False), ("is_concatenated", True), ("has_gate", True)):
        if getattr(ex, attr, ok) != ok:
            raise NotImplementedError(f"{type(ex).__name__}.{attr}={getattr(ex, attr)} is not supported")
    E, twoF, H = ex.gate_up_proj.shape
    template = GLUExpert(H, twoF // 2, copy.deepcopy(ex.act_fn)).to(ex.gate_up_proj.dtype)
    experts = [{"gate_up_proj.weight": ex.gate_up_proj[e], "down_proj.weight": ex.down_proj[e]} for e in range(E)]
    # Mixtral's router renormalises unconditionally (it has no norm_topk_prob attribute).
    norm = bool(getattr(router, "norm_topk_prob", True))
    return router, router.weight, int(router.top_k), norm, template, experts


def _expert_rank(ep_size: int) -> int:
    if ep_size == 1:
        return 0
    if not dist.is_initialized():
        raise RuntimeError(f"ep_size={ep_size} needs torch.distributed: call deepspeed.init_distributed() first")
    if dist.get_world_size() % ep_size:
        raise ValueError(f"world size {dist.get_world_size()} is not a multiple of ep_size={ep_size}")
    return group_rank(expert_parallel_group(ep_size))


def replace_moe_blocks(model: nn.Module, ep_size: int = 1,
                       replication: Union[ReplicationConfig, Mapping[str, Any], None] = None,
                       mode: str = "replicated", dropless: bool = True, set_groups: Optional[bool] = None,
                       **moe_kwargs: Any) -> List[str]:
    """Swap every sparse MLP block of ``model`` (in place) for a ``DeepSpeedMoEBlock``.

    Args:
        model: a transformers SwitchTransformers, Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE model
            (any head), with all experts' weights loaded (identical on every rank).
        ep_size: expert-parallel world size W; E must be a multiple of W. Rank r of the
            expert-parallel group keeps experts r*E/W .. (r+1)*E/W - 1.
        replication: the ``"moe_replication"`` section (or a ``ReplicationConfig``) for
            ``ReplicatedMoE``; None leaves replication off. Ignored for ``mode="stock"``.
        mode: ``"replicated"`` (``ReplicatedMoE``) or ``"stock"`` (``deepspeed.moe.layer.MoE``).
        dropless: DeepSpeed ``drop_tokens=False`` (every routed token is computed).
        set_groups: create/attach the expert-parallel groups now (default: when torch.distributed
            is initialised). Pass False when the model goes to ``deepspeed.initialize`` next,
            which attaches them itself.
        **moe_kwargs: further ``MoE`` arguments (e.g. ``eval_capacity_factor``).

    Returns:
        The qualified names of the replaced blocks, in module order.
    """
    if mode not in ("replicated", "stock"):
        raise ValueError(f"mode must be 'replicated' or 'stock', got {mode!r}")
    from deepspeed.moe.layer import MoE

    blocks = find_moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no sparse MLP block replace_moe_blocks knows "
                         f"({_SWITCH_BLOCK}, or a block whose gate is one of {', '.join(_FUSED_ROUTERS)})")
    rank = _expert_rank(ep_size)
    if set_groups is None:
        set_groups = dist.is_initialized()
    names = []
    for name, block in blocks:
        family = _family(block)
        router, weight, k, norm, template, experts = (_switch_parts if family == "switch" else _fused_parts)(block)
        E, H = weight.shape
        if E % ep_size:
            raise ValueError(f"{name}: {E} experts are not divisible by ep_size={ep_size}")
        e_loc = E // ep_size
        kwargs: Dict[str, Any] = dict(num_experts=E, ep_size=ep_size, k=k, drop_tokens=not dropless, use_rts=False,
                                      top2_2nd_expert_sampling=False, min_capacity=0 if dropless else 4)
        kwargs.update(moe_kwargs)
        if mode == "stock":
            moe = MoE(H, template, **kwargs)
        else:
            moe = ReplicatedMoE(H, template, **kwargs, replication=replication)
        moe.to(device=weight.device)
        # NOTE: the gate shares the router's Parameter: one weight, trained and saved once.
        moe.deepspeed_moe.gate.wg.weight = weight
        with torch.no_grad():
            for j, local in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
                source = experts[rank * e_loc + j]
                state = source.state_dict() if isinstance(source, nn.Module) else source
                local.load_state_dict({n: t.detach().clone() for n, t in state.items()}, strict=True)
        if set_groups:
            moe.set_deepspeed_parallelism()
        wrapper = DeepSpeedMoEBlock(router, moe, family, k, norm,
                                    getattr(block, "shared_expert", None), getattr(block, "shared_expert_gate", None))
        wrapper.train(block.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
        names.append(name)
    return names
