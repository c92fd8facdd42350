"""Test and example support that the library may import: real multi-process runs on gloo
(``ranks``) and shared fixtures (``fixtures``)."""

from .fixtures import build_pair, expert_mlp, share_for_hottest, steer, tiny_lm
from .ranks import RankFailure, free_port, remove_shm_buffers, run_ranks

__all__ = ["run_ranks", "free_port", "remove_shm_buffers", "RankFailure", "build_pair", "expert_mlp", "steer",
           "share_for_hottest", "tiny_lm"]
