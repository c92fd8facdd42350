"""Where the kernel tests launch kernels: compiled on a CUDA device when one is present, else in
Triton's CPU interpreter inside one helper process.

NOTE: Triton reads ``TRITON_INTERPRET`` when ``triton`` is first imported, and this test process
imported it long before (the package does, for the twins). So the interpreted launches run in a
spawned process born with ``TRITON_INTERPRET=1``; the variable is set only around its start, and
the rest of the suite never sees it. Results come back to this process, which compares them
with the twins.
"""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

import kernel_workers
from kernel_workers import on_gpu


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if on_gpu() else "cpu")


@pytest.fixture(scope="session")
def launch():
    """``launch("permute", x, order, k)``: the Triton launcher's result (compiled or interpreted)."""
    if on_gpu():
        yield kernel_workers.launch
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(kernel_workers.ping).result()  # the helper starts while the variable is set
    try:
        yield lambda name, *args: pool.submit(kernel_workers.launch, name, *args).result()
    finally:
        pool.shutdown()
