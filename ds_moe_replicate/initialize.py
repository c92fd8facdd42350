"""``ds_moe_replicate.initialize``: ``deepspeed.initialize`` plus the ``moe_replication`` section.

One call for users: it runs ``deepspeed.initialize`` with the same arguments (AutoEP, if the
config has ``expert_parallel``, swaps the MoE blocks there), applies the section to every
replicable layer (``configure_replication``: ``ReplicatedMoE`` and AutoEP layers alike), and
returns what ``deepspeed.initialize`` returned. With a monitor configured (``tensorboard`` /
``csv_monitor`` / ...), each layer's statistics go to ``engine.monitor`` (``monitor.py``).

An enabled section that ends up applied to no layer must not fail silently: a forward pre-hook on
the model warns once, on rank 0, at the first forward (a check inside ``deepspeed.initialize``'s
engine would not be ours to add; the hook is).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Mapping, Optional

import deepspeed
import torch.distributed as dist
from torch import nn

from .compat import check_transformers_for_autoep
from .config import SECTION, ReplicationConfig
from .layer import configure_replication
from .monitor import attach_monitor, replicable_layers

__all__ = ["initialize"]

logger = logging.getLogger(__name__)


def _config_of(args: tuple, kwargs: Mapping[str, Any]) -> Optional[Any]:
    """The DeepSpeed config passed to ``deepspeed.initialize`` (dict or path), if given directly."""
    if len(args) > 10:
        return args[10]
    return kwargs.get("config", kwargs.get("config_params"))


def _warn_if_never_applied(model: nn.Module, config: ReplicationConfig) -> None:
    """Warn once, on rank 0, at the model's first forward if no layer replicates."""

    def check(module: nn.Module, _inputs) -> None:
        handle.remove()
        if any(layer.replication.enabled for layer in replicable_layers(module)):
            return
        if not dist.is_initialized() or dist.get_rank() == 0:
            logger.warning("moe_replication is enabled in the DeepSpeed config but no MoE layer of %s replicates "
                           "(it has no ReplicatedMoE nor AutoEP layer, or they were replaced or re-configured "
                           "after ds_moe_replicate.initialize): this run has no expert replication",
                           type(module).__name__)

    handle = model.register_forward_pre_hook(check)


@functools.wraps(deepspeed.initialize)
def initialize(*args: Any, **kwargs: Any):
    """``deepspeed.initialize`` (same arguments, same return value) that also applies the
    config's ``moe_replication`` section to every replicable layer, on every rank.

    Returns:
        ``(engine, optimizer, training_dataloader, lr_scheduler)`` from ``deepspeed.initialize``.
    """
    raw = _config_of(args, kwargs)
    if isinstance(raw, Mapping) and raw.get("expert_parallel", {}).get("enabled") and \
            raw.get(SECTION, {}).get("enabled"):
        # NOTE: before deepspeed.initialize, whose AutoEP replacement is what fails on other versions.
        check_transformers_for_autoep()
    result = deepspeed.initialize(*args, **kwargs)
    engine = result[0]
    config = ReplicationConfig.from_ds_config(engine.config)
    configure_replication(engine, require_layers=False)
    if config.enabled:
        _warn_if_never_applied(engine.module, config)
    attach_monitor(engine)
    return result
