"""Triton kernels for ds_moe_replicate, each with a pure-PyTorch twin.

Installed as ``ds_moe_replicate.kernels`` (the bare name ``kernels`` is taken on the package
index). One file per kernel; each holds a private ``_<name>_kernel``, a public launcher
``<name>(...)`` and its twin ``<name>_torch(...)`` with the same signature:

- ``topk_gating``: softmax + top-k + per-expert counts of the gate, fused.
- ``assign_slots``: each route's physical slot among its expert's copies and its row in the
  send buffer (replaces an argsort, a bincount, a cumsum and a stable sort by slot).
- ``permute``: gather token rows into send-buffer order.
- ``combine``: gather expert outputs back to token order, gate-weighted in fp32, summed over k.

``import triton`` is optional: the package imports without it and the twins serve CPUs.
``ds_moe_replicate.ops`` picks kernel or twin from ``moe_replication.kernels``.
"""

try:  # NOTE: Triton is an optional extra; CPU-only installs run the PyTorch twins.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

__all__ = ["HAS_TRITON"]
