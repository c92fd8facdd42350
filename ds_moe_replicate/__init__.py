"""ds_moe_replicate: lossless predictive expert replication for DeepSpeed expert-parallel MoE."""

from .config import ReplicationConfig, ReplicationConfigError
from .initialize import initialize
from .layer import ReplicatedMoE, configure_replication
from .planner import ReplicaPlan, balancedness, max_rank_load_lower_bound, plan_replicas, split_loads

__version__ = "0.1.0"

__all__ = [
    "ReplicatedMoE",
    "configure_replication",
    "initialize",
    "ReplicationConfig",
    "ReplicationConfigError",
    "ReplicaPlan",
    "plan_replicas",
    "split_loads",
    "balancedness",
    "max_rank_load_lower_bound",
]
