"""Replication statistics through DeepSpeed's monitor (``tensorboard`` / ``csv_monitor`` / ...).

A stats hook per replicated layer turns each ``StepStats`` into monitor events named
``Replication/layer<uid>/<field>``; the step of an event is the layer's own forward count
(``StepStats.step``), which advances in inference too, where the engine's sample count does not.
DeepSpeed's monitor writes on rank 0 only; the statistics are the same on every rank.
"""

from __future__ import annotations

from typing import Callable, List

from torch import nn

from .hooks import RemovableHandle, StepStats

__all__ = ["MONITORED", "replicable_layers", "stats_events", "attach_monitor"]

# StepStats fields written to the monitor, and the event name of each.
MONITORED = {"balancedness": "balancedness", "num_replicas": "replicas", "bytes_moved": "bytes_moved",
             "exposed_wait_ms": "exposed_wait_ms"}


def replicable_layers(model: nn.Module) -> List[nn.Module]:
    """The model's layers that hold a ``moe_replication`` config: the inner layer of each
    ``ReplicatedMoE`` and each adopted AutoEP layer, in module order."""
    from .autoep import ReplicatedAutoEPLayer
    from .layer import ReplicatedMOELayer

    return [m for m in model.modules() if isinstance(m, (ReplicatedMOELayer, ReplicatedAutoEPLayer))]


def stats_events(stats: StepStats, uid: int) -> list:
    """``(name, value, step)`` events of one layer's step, as ``monitor.write_events`` takes them."""
    return [(f"Replication/layer{uid}/{name}", float(getattr(stats, field)), stats.step)
            for field, name in MONITORED.items()]


def _writer(monitor, uid: int) -> Callable[[StepStats], None]:
    return lambda stats: monitor.write_events(stats_events(stats, uid))


def attach_monitor(engine) -> List[RemovableHandle]:
    """Write every replicated layer's statistics through ``engine.monitor`` (when enabled).

    Returns:
        The stats-hook handles (empty without an enabled monitor).
    """
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not getattr(monitor, "enabled", False):
        return []
    return [layer.hooks.register(_writer(monitor, layer.uid)) for layer in replicable_layers(engine.module)]
