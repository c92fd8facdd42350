"""Versions of home expert weights: a number that changes whenever the weights may have changed.

A replica is a copy of its home expert's weights at one version; it may serve tokens only while
that version is current (docs/design.md, "Never stale"). The version of a rank's home experts is
derived from what PyTorch and the layer can see:

- every optimizer step anywhere in the process (a global ``torch.optim`` step hook, which also
  fires inside DeepSpeed's ZeRO optimizers, whose inner optimizer is a ``torch.optim`` one);
- in-place changes to the parameters themselves (each tensor's ``_version`` counter) and
  re-allocations (``data_ptr``, dtype, device: ``.to()``, ``.half()``, ``.cuda()``);
- the layer's own counter, bumped by ``load_state_dict``, ``_apply``, ``train()``/``eval()``
  and re-configuration.

Changes that bypass all of these (writing through ``param.data`` outside an optimizer step) are
not seen: call ``layer.weights_changed()`` after such an edit.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["optimizer_steps", "weights_version"]

_steps = [0]


def _count_step(*_args, **_kwargs) -> None:
    _steps[0] += 1


register_optimizer_step_post_hook(_count_step)


def optimizer_steps() -> int:
    """Optimizer steps taken in this process so far (any optimizer)."""
    return _steps[0]


def weights_version(params: Iterable[torch.Tensor], changes: int) -> int:
    """A 62-bit number that changes when any of ``params`` may have changed.

    Args:
        params: this rank's home expert parameters.
        changes: the layer's own change counter.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{optimizer_steps()}:{changes}".encode())
    for p in params:
        h.update(f"|{p._version}:{p.data_ptr()}:{p.dtype}:{p.device}".encode())
    return int.from_bytes(h.digest(), "little") >> 2
