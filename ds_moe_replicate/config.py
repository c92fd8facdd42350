"""The ``"moe_replication"`` section of a DeepSpeed JSON config.

``ReplicationConfig`` is a DeepSpeed-style pydantic model: unknown keys and bad values are
refused, and every error names the offending field as ``moe_replication.<field>``. The JSON files
in ``configs/`` are plain serialisations of it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal, Mapping, Optional, Union

from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from pydantic import Field, ValidationError, ValidationInfo, field_validator

from .predictor import PREDICTORS, EmaPredictor, name_of

SECTION = "moe_replication"

KernelChoice = Literal["auto", "triton", "torch"]


class ReplicationConfigError(ValueError):
    """A ``moe_replication`` section that cannot be used; the message names each bad field."""


class ReplicationConfig(DeepSpeedConfigModel):
    """Predictive expert replication for ``ReplicatedMoE``, read from ``"moe_replication"``."""

    enabled: bool = False
    """Turn replication on. Off, ``ReplicatedMoE`` computes exactly what the stock
    ``deepspeed.moe.layer.MoE`` computes, through the stock code path."""

    slots_per_rank: int = Field(1, ge=0)
    """Replica slots per expert-parallel rank (S): how many copies of other ranks' experts each
    rank may hold besides its own. Each slot costs the memory of one expert (one buffer, in which
    a slot is refilled only while nothing reads it); a training step also holds the fetched copies
    and their gradients until its backward ends, as activations."""

    replan_interval: int = Field(4, ge=1)
    """Forward steps between re-plans. At a re-plan the predicted loads give a new placement,
    whose replica weights are prefetched and become active at the next step."""

    predictor: str = name_of(EmaPredictor)
    """Load predictor behind the plan: ``"ema"`` (exponential moving average of the gathered
    expert counts), ``"window"`` (mean over the last ``window`` steps), ``"lookahead"`` (this
    batch's loads, predicted one layer ahead by applying the layer's gate to the previous layer's
    input, and prefetched while that layer computes; the first MoE layer is predicted from the
    input embeddings when ``configure_replication`` attached a hook there, else by ``"ema"``),
    ``"learned"`` (every layer's loads predicted from the batch's token embeddings by the small
    model at ``learned_path``, distilled from the routers by ``launch/train_predictor.py``), or
    ``"oracle"`` (this step's real counts, waiting for the transfer: an upper bound for
    experiments). History predictors re-plan every ``replan_interval`` steps; the others every step."""

    learned_path: Optional[str] = None
    """File of the ``"learned"`` predictor (required by it, ignored otherwise)."""

    ema_decay: float = Field(0.5, gt=0.0, lt=1.0)
    """Weight of the history in the ``"ema"`` predictor: ``pred = decay * pred + (1 - decay) * counts``."""

    window: int = Field(8, ge=1)
    """Steps averaged by the ``"window"`` predictor."""

    dropless: bool = True
    """Compute every routed token (uneven all-to-all, no padding). ``false`` applies DeepSpeed's
    capacity-factor semantics per physical slot: a replicated expert has capacity in every copy,
    so fewer tokens are dropped than by the stock layer."""

    prefer_local: bool = True
    """When an expert has a copy on the token's own rank, send that rank's tokens to it first
    (saves all-to-all traffic; the per-copy token counts are unchanged)."""

    kernels: KernelChoice = "auto"
    """Bookkeeping kernels: ``"auto"`` (Triton on CUDA devices of a kind on which the compiled
    kernel tests passed, listed in ``kernels/verified.json``; PyTorch twins elsewhere), ``"triton"``
    (force Triton; on CPU only under ``TRITON_INTERPRET=1``) or ``"torch"`` (force the twins)."""

    replica_cost: float = Field(0.05, ge=0.0)
    """What one replica costs per step, as a fraction of a mean rank's load (its weights travel
    to the copy; in training its gradient travels back too, so the cost counts twice). A plan
    keeps only the replicas that lower the predicted largest rank load by more than they cost;
    under even routing that is none. 0 makes every slot's replica."""

    timeout_s: float = Field(300.0, gt=0.0)
    """Longest wait, in seconds, for replica weights or their gradients; past it every rank of
    the group raises ``ReplicationError`` instead of hanging."""

    @field_validator("predictor")
    @classmethod
    def _known_predictor(cls, value: str) -> str:
        if value not in PREDICTORS:
            raise ValueError(f"unknown predictor {value!r}; one of {sorted(PREDICTORS)}")
        return value

    @field_validator("learned_path")
    @classmethod
    def _learned_needs_a_file(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        # NOTE: runs for the default too (validate_default), after ``predictor`` (declared first).
        name = info.data.get("predictor")
        if name in PREDICTORS and PREDICTORS[name].needs_file and not value:
            raise ValueError(f"required when predictor is {name!r} (a file made by launch/train_predictor.py)")
        return value

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> "ReplicationConfig":
        """Validate a ``moe_replication`` mapping, raising ``ReplicationConfigError`` naming fields."""
        if not isinstance(data, Mapping):
            raise ReplicationConfigError(
                f"{SECTION}: expected a JSON object, got {type(data).__name__} ({data!r})")
        try:
            return cls(strict=True, **dict(data))
        except ValidationError as err:
            lines = []
            for e in err.errors():
                field = ".".join(str(part) for part in e["loc"]) or "<section>"
                got = f" (got {e['input']!r})" if "input" in e and e["type"] != "missing" else ""
                lines.append(f"{SECTION}.{field}: {e['msg']}{got}")
            raise ReplicationConfigError("invalid DeepSpeed config section:\n  " + "\n  ".join(lines)) from None

    @classmethod
    def from_ds_config(cls, config: Union[str, os.PathLike, Mapping[str, Any], None]) -> "ReplicationConfig":
        """Read the ``"moe_replication"`` section of a DeepSpeed config.

        Args:
            config: a path to a DeepSpeed JSON file, the parsed dict (``engine.config`` after
                ``deepspeed.initialize``), or None.

        Returns:
            The validated section; an absent section (or None) gives replication disabled.
        """
        if config is None:
            return cls()
        if isinstance(config, (str, os.PathLike)):
            with open(config, encoding="utf-8") as fh:
                try:
                    config = json.load(fh)
                except json.JSONDecodeError as err:
                    raise ReplicationConfigError(f"{os.fspath(config)}: not valid JSON ({err})") from None
        if not isinstance(config, Mapping):
            raise ReplicationConfigError(f"expected a DeepSpeed config dict or path, got {type(config).__name__}")
        section = config.get(SECTION)
        return cls() if section is None else cls.parse(section)

    @classmethod
    def coerce(cls, value: Union["ReplicationConfig", Mapping[str, Any], None]) -> "ReplicationConfig":
        """Accept a config, a section dict, or None (replication off)."""
        if value is None:
            return cls()
        if isinstance(value, ReplicationConfig):
            return value
        return cls.parse(value)
