"""Process-group start and stop for the launcher jobs (training, inference, benchmarks, evaluation).

Lives in the library, not in ``bench/``, because the training job and the evaluation harness need
it and the library never imports its benchmarks.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "device_for_rank"]


def init_distributed() -> None:
    """Initialise ``deepspeed.comm`` as the ``deepspeed`` launcher expects: NCCL on GPUs, gloo on CPU.

    On CPU, DeepSpeed's shared-memory all-reduce op is not loaded: these jobs exchange through
    all-gather and all-to-all, and the op leaves a 69 MB file per rank and port in /dev/shm.
    """
    import deepspeed
    import deepspeed.ops

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "gloo":
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        atexit.register(_finish_distributed)
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def _finish_distributed() -> None:
    # NOTE: tearing the process group down explicitly, after any replica transfer still in
    # flight, avoids an abort ("terminate called without an active exception") when the
    # interpreter destroys gloo's threads on its own at exit.
    from .replicas import finish_in_flight

    finish_in_flight()
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for_rank() -> torch.device:
    """This rank's device: its GPU (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")
