"""Versions of the libraries around AutoEP that replication has been checked against.

DeepSpeed 0.19's AutoEP runs with transformers 5.18; with 5.24 ``deepspeed.initialize`` fails
inside AutoEP's presets (``_CanRecordRegistry.get() takes 2 positional arguments but 3 were
given``, ``auto_ep_presets/base.py``). The ``eval`` extra pins the working range; this check
turns a version outside it into one clear error before any collective runs.
"""

from __future__ import annotations

from typing import Optional, Tuple

__all__ = ["AUTOEP_TRANSFORMERS", "check_transformers_for_autoep"]

# [lowest, first unsupported) release of transformers that AutoEP replication is tested on.
AUTOEP_TRANSFORMERS: Tuple[Tuple[int, int], Tuple[int, int]] = ((5, 18), (5, 19))


def _major_minor(version: str) -> Tuple[int, int]:
    parts = version.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def check_transformers_for_autoep(version: Optional[str] = None) -> None:
    """Raise ``RuntimeError`` naming the versions when transformers is outside the tested range.

    Args:
        version: the version to check; None reads the installed one (absent: nothing to check,
            AutoEP then runs on models that are not Hugging Face ones).
    """
    if version is None:
        try:
            import transformers
        except ImportError:
            return
        version = transformers.__version__
    lo, hi = AUTOEP_TRANSFORMERS
    if not lo <= _major_minor(version) < hi:
        raise RuntimeError(
            f"DeepSpeed AutoEP with moe_replication needs transformers>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]} "
            f"(found {version}); AutoEP fails on later releases (transformers 5.24: '_CanRecordRegistry.get() "
            f"takes 2 positional arguments but 3 were given'). Install it with "
            f"pip install 'transformers>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}'")
