"""Triton kernels for ds_moe_replicate, each with a pure-PyTorch twin.

Installed as ``ds_moe_replicate.kernels`` (the bare name ``kernels`` is taken on the package
index). ``import triton`` is optional: the package imports without it and the twins serve CPUs.
The kernels themselves land with the kernels work; this package exists now so the install layout
is fixed from the start.
"""

try:  # NOTE: Triton is an optional extra; CPU-only installs run the PyTorch twins.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

__all__ = ["HAS_TRITON"]
