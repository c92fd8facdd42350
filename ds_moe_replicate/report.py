"""Printed tables and JSON reports of the command-line jobs (rank 0 only)."""

from __future__ import annotations

import json
from typing import Any, List, Optional

import torch.distributed as dist

__all__ = ["markdown_table", "report", "write_json"]


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    """A markdown table from a header and rows of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(settings: str, table_md: str, rows: List[Any], json_path: Optional[str]) -> None:
    """On rank 0: print what was compared on which settings, the table, and save the rows as JSON."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    print(f"\n{settings}\n{table_md}", flush=True)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(rows, fh, indent=1)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path``, creating its folder."""
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
