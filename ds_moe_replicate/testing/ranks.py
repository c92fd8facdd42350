"""Run a function on several real processes with a gloo process group (tests, examples).

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes on a free port, initialises
``deepspeed.comm`` with gloo in each, calls ``fn(rank, *args)`` and returns the per-rank results.
A rank that raises or hangs fails the whole run within ``timeout`` seconds, with that rank's
traceback; no process is left behind.
"""

from __future__ import annotations

import glob
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, List

import torch.multiprocessing as mp

__all__ = ["run_ranks", "free_port", "remove_shm_buffers", "RankFailure"]


class RankFailure(RuntimeError):
    """A rank of ``run_ranks`` raised, or the run did not finish in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results, backend: str = "gloo") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world_size), OMP_NUM_THREADS="1")
    try:
        import torch

        torch.set_num_threads(1)
        import deepspeed
        import deepspeed.ops

        # NOTE: DeepSpeed's CPU shared-memory all-reduce leaves a 69 MB file per rank and port in
        # /dev/shm (RAM) that nothing removes; the tests do not need it, so it is not loaded.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if backend == "nccl":
            torch.cuda.set_device(rank)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        results.put((rank, True, fn(rank, *args)))
    except BaseException:  # noqa: BLE001 - the traceback goes to the parent
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 240.0, backend: str = "gloo") -> List[Any]:
    """Call ``fn(rank, *args)`` on ``world_size`` ranks (gloo; ``backend="nccl"`` puts rank r on
    CUDA device r); return results in rank order.

    ``fn`` must be importable (a module-level function); results must be picklable.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, results, backend), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict = {}
    errors: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(out) - set(errors))
                raise RankFailure(f"ranks {missing} did not finish within {timeout:.0f} s"
                                  + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in errors.items()))
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and r not in out and r not in errors]
                if dead:
                    raise RankFailure(f"ranks {dead} died (exit codes {[procs[r].exitcode for r in dead]})") from None
                continue
            (out if ok else errors)[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        remove_shm_buffers(port)
    if errors:
        raise RankFailure("".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [out[r] for r in range(world_size)]


def remove_shm_buffers(port: int) -> None:
    """Delete the shared-memory files DeepSpeed's CPU all-reduce made for a run on ``port``
    (``deepspeed --master_port PORT`` runs leave them behind: 69 MB of RAM per rank)."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.remove(path)
        except OSError:
            pass
