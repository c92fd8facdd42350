"""What every kernel launcher shares: whether Triton interprets, input checks and the tuned
launch parameters (``tuned.json``, written by ``launch/tune_kernels.py``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional

import torch

# Read with the import of this package, which imports triton (kernels/__init__.py).
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Row dtypes the data-moving kernels accept.
FLOATS = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["interpreting", "check", "tuned", "forced", "next_pow2", "cdiv", "device_name", "TUNED_PATH",
           "VERIFIED_PATH", "verified"]

TUNED_PATH = Path(__file__).with_name("tuned.json")
# Device kinds on which the kernel tests passed compiled (written by launch/gpu_check.sh).
VERIFIED_PATH = Path(__file__).with_name("verified.json")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter.

    NOTE: Triton reads ``TRITON_INTERPRET`` once, when ``triton`` is imported (its own library
    functions are decorated then), so the variable counts only if it was set before that.
    """
    return _INTERPRET_AT_IMPORT


def check(name: str, t: torch.Tensor, dtypes: Iterable[torch.dtype], dim: int, device: torch.device) -> None:
    """Raise ``ValueError`` naming the argument if ``t`` has the wrong dtype, rank or device, and
    ``RuntimeError`` for a CPU tensor outside Triton's interpreter."""
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name}: expected {dim} dimensions, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device}")
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(f"{name}: Triton kernels run on CPU tensors only with TRITON_INTERPRET=1 set before "
                           "triton is imported")


def device_name(device: torch.device) -> str:
    """The device key of ``tuned.json``: the CUDA device's name, else "interpreter" or the type."""
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return "interpreter" if interpreting() else device.type


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=1)
def _table(path: str) -> Mapping[str, Any]:
    try:
        with open(path) as f:
            return json.load(f).get("devices", {})
    except FileNotFoundError:
        return {}


_FORCED: Dict[str, Mapping[str, int]] = {}


def tuned(kernel: str, device: torch.device, key: str, defaults: Mapping[str, int],
          path: Optional[Path] = None) -> Dict[str, int]:
    """Launch parameters for ``kernel`` at shape ``key`` on ``device``: the tuned entry of
    ``tuned.json`` (devices -> kernel -> key -> params) over ``defaults``, else ``defaults``."""
    entry = _FORCED.get(kernel) or _table(str(path or TUNED_PATH)).get(device_name(device), {}).get(kernel, {}).get(
        key, {})
    return {**defaults, **{k: int(v) for k, v in entry.items() if k in defaults}}


@contextlib.contextmanager
def forced(kernel: str, params: Mapping[str, int]) -> Iterator[None]:
    """Launch ``kernel`` with ``params`` inside the block (the tuning script's candidates)."""
    _FORCED[kernel] = dict(params)
    try:
        yield
    finally:
        _FORCED.pop(kernel, None)


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1) (Triton block sizes must be powers of two)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def verified(device: torch.device, path: Optional[Path] = None) -> bool:
    """True when the compiled kernel tests passed on this kind of device (``verified.json``,
    ``{"devices": [names]}``, written by ``launch/gpu_check.sh``)."""
    if device.type != "cuda":
        return False
    try:
        with open(str(path or VERIFIED_PATH)) as f:
            names = json.load(f).get("devices", [])
    except FileNotFoundError:
        return False
    return device_name(device) in names
