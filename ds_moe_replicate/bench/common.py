"""Shared pieces of the benchmarks: re-exports of the library's fixtures, runtime and report
helpers (the benchmarks import the library, never the other way round).

Legend: T tokens, H hidden, F expert FFN size, E logical experts, W expert-parallel ranks.
"""

from __future__ import annotations

from ..report import markdown_table, report
from ..runtime import all_max, device_for_rank, init_distributed, median, timed
from ..testing import build_pair, expert_mlp, share_for_hottest, steer
from ..tiny_switch import add_tiny_switch_args

__all__ = ["expert_mlp", "build_pair", "steer", "share_for_hottest", "timed", "median", "all_max",
           "init_distributed", "device_for_rank", "markdown_table", "report", "add_tiny_switch_args"]

