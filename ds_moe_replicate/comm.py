"""Communication for the replicated layer: the one adapter to DeepSpeed's process groups, the
gathered-counts collective that doubles as an error agreement, and an uneven all-to-all.

Every collective here is issued by every rank of the expert-parallel group in the same order, on
tensors that live on the layer's device (NCCL takes device tensors only). An error found before a
step's all-gather is not raised on the spot (the other ranks would wait forever in it): it
travels in the all-gather as a status code, and every rank raises ``ReplicationError`` naming
the rank(s) and the cause. The same all-gather carries a fingerprint of what the ranks must
agree on (config, plan, mode, dtype, links), so ranks that disagree are told what differs
instead of issuing mismatched collectives (docs/design.md, "Never hang").

Legend: W expert-parallel ranks, E logical experts.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from . import native

__all__ = ["ReplicationError", "expert_parallel_group", "group_size", "group_rank", "global_rank", "Fingerprint",
           "Gathered", "GatherBuffer", "gather_step", "all_to_all", "raise_failures", "failure_code", "FAILURES",
           "dtype_code", "SITE_LAYER", "SITE_ENTRY", "SITE_OFF"]



class ReplicationError(RuntimeError):
    """A step of the replicated layer failed on at least one expert-parallel rank, or the ranks
    disagree on what the step is. Raised on every rank of the group in the same step."""


def expert_parallel_group(ep_size: int, use_data_before_expert_parallel: bool = False):
    """The expert-parallel group of this rank for ``ep_size``, created through DeepSpeed if needed.

    The only place that calls DeepSpeed's private ``groups._*`` API.
    """
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel)
    return groups._get_expert_parallel_group(name)


def group_size(group) -> int:
    return 1 if group is None or not dist.is_initialized() else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None or not dist.is_initialized() else dist.get_rank(group)


def global_rank(group, rank_in_group: int) -> int:
    """Global rank of a rank of ``group`` (point-to-point calls take global ranks)."""
    return rank_in_group if group is None else dist.get_global_rank(group, rank_in_group)


# What went wrong, as a status code that travels in the step's collectives (0 = fine).
FAILURES = {1: "bad input", 2: "expert computation", 3: "replica transfer", 4: "replication policy",
            5: "stats hook", 6: "out of memory", 7: "error"}
_CODE = {name: code for code, name in FAILURES.items()}


def failure_code(err: BaseException, where: str) -> int:
    """The status code of ``err``, raised in the step phase ``where`` (a ``FAILURES`` name)."""
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        return _CODE["out of memory"]
    return _CODE.get(where, _CODE["error"])


def raise_failures(codes_W: Sequence[int], error: Optional[BaseException], rank: int) -> None:
    """Raise ``ReplicationError`` on this rank if any rank reported a failure code.

    Args:
        codes_W: the status code of every rank (0 = fine), the same on every rank.
        error: this rank's own exception, if it had one.
        rank: this rank in the group.
    """
    failed = {r: int(c) for r, c in enumerate(codes_W) if int(c) != 0}
    if not failed:
        return
    what = ", ".join(f"rank {r}: {FAILURES.get(c, 'error')}" for r, c in failed.items())
    if error is not None:
        raise ReplicationError(f"expert-parallel rank {rank} failed ({FAILURES.get(failed.get(rank, 7), 'error')}): "
                               f"{type(error).__name__}: {error} [failures this step: {what}]") from error
    raise ReplicationError(f"expert-parallel rank(s) {sorted(failed)} failed in this step ({what}; see their "
                           f"error); rank {rank} stops too instead of waiting")


# Where in the model a step's all-gather is issued: ranks at different sites have left step.
SITE_LAYER, SITE_ENTRY, SITE_OFF = 1, 2, 3
_SITES = {SITE_LAYER: "a replicated MoE layer", SITE_ENTRY: "the lookahead entry hook",
          SITE_OFF: "an MoE layer with replication off"}


class Fingerprint(NamedTuple):
    """What every rank must agree on at a step; gathered and compared field by field (a named
    tuple: built every layer step, and a tuple builds in a fraction of a dataclass's time).

    Attributes:
        site: SITE_LAYER, SITE_ENTRY or SITE_OFF.
        config: hash of the ``moe_replication`` section.
        plan_version / placement: version and digest of the placement that serves the step.
        grad_mode: 1 when replica weights travel with the step and gradients go home, else 0;
            plus 2 in train() mode, plus 4 when the layer's input requires a gradient (the
            gradient return is then ordered after the dispatch's backward, else after the
            combine's: ranks must agree).
        dtype: code of the input dtype.
        links: lookahead wiring of the layer (experts of the layer it predicts, 0 if none;
            plus 1 << 20 when a previous layer predicts it).
    """

    site: int
    config: int = 0
    plan_version: int = 0
    placement: int = 0
    grad_mode: int = 0
    dtype: int = 0
    links: int = 0

    HINTS = {
        "site": "some ranks have replication on and others off, or run a different model",
        "config": "apply the same moe_replication section on every rank (configure_replication)",
        "plan_version": "ranks hold different replica plans",
        "placement": "ranks hold different replica plans",
        "grad_mode": "every rank must run the step in the same train()/eval() mode and torch.no_grad() state",
        "dtype": "every rank must pass inputs of the same dtype",
        "links": "ranks linked different MoE layers for lookahead (a different model or call order)",
    }

    def values(self) -> List[int]:
        return [int(v) for v in self]


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else 99


# Header: status, tokens, landed, home weights version, the predicted layer's home weights
# version, then the fingerprint fields.
_HEAD = 5
HEADER = _HEAD + len(Fingerprint.HINTS)


class Gathered:
    """What every rank learns from a step's all-gather (identical on every rank), read from the
    gathered buffer on demand (each field is a view or a small array; building them all every step
    costs more than the step reads). The per-rank fields are views of the layer's ``GatherBuffer``:
    read them during the step (copy what must outlive it); the sums are the step's own arrays.

    Attributes:
        counts_WE: int64 [W, E] routes per rank and expert of this layer.
        tokens_W: int64 [W] tokens per rank.
        landed_W: bool [W] each rank's replica transfers in flight have all finished.
        version_W: int64 [W] version of each rank's home expert weights.
        ahead_WE: int64 [W, E] predicted routes of the layer this one predicts (zeros if none).
        ahead_version_W: int64 [W] version of that layer's home expert weights on each rank.
        total_E: int64 [E] ``counts_WE`` summed over ranks (the step's routes per expert).
        ahead_total_E: int64 [E] ``ahead_WE`` summed over ranks.
        counts_ptr: the address of ``counts_WE``'s first element (a strided view's address
            costs microseconds to look up; the split reads it from here), or 0.
    """

    __slots__ = ("_out", "_E", "total_E", "ahead_total_E", "counts_ptr")

    def __init__(self, out_WN: np.ndarray, num_experts: int, total_E: np.ndarray, ahead_total_E: np.ndarray,
                 counts_ptr: int = 0) -> None:
        self._out, self._E = out_WN, num_experts
        self.total_E, self.ahead_total_E = total_E, ahead_total_E
        self.counts_ptr = counts_ptr

    @property
    def counts_WE(self) -> np.ndarray:
        return self._out[:, HEADER:HEADER + self._E]

    @property
    def ahead_WE(self) -> np.ndarray:
        return self._out[:, HEADER + self._E:]

    @property
    def tokens_W(self) -> np.ndarray:
        return self._out[:, 1]

    @property
    def landed_W(self) -> np.ndarray:
        return self._out[:, 2] != 0

    @property
    def version_W(self) -> np.ndarray:
        return self._out[:, 3]

    @property
    def ahead_version_W(self) -> np.ndarray:
        return self._out[:, 4]


class GatherBuffer:
    """A layer's host memory for its steps' all-gathers (its payload and the gathered rows),
    reused from step to step, with the views and tensors over it made once. A fresh buffer of a
    few hundred kilobytes every step (W = 64, E = 256) costs a page fault on each of its pages, tens
    of microseconds (the allocator hands memory that large back to the system when it is freed),
    and making the views costs microseconds per step more. What ``Gathered`` reads from it is valid
    until the layer's next step; the sums over ranks are arrays of their own.

    Attributes (for W ranks and payloads of N entries, after ``fit``):
        payload: int64 [N] this rank's payload; payload_t the same memory as a tensor.
        rows: int64 [W, N] the gathered payloads; rows_t the same memory as a flat tensor.
        rows_ptr: the address of ``rows``.
    """

    __slots__ = ("shape", "payload", "payload_t", "rows", "rows_t", "rows_ptr")

    def __init__(self) -> None:
        self.shape = (0, 0)

    def fit(self, W: int, N: int) -> "GatherBuffer":
        """Memory for W payloads of N entries (the same while the sizes stay)."""
        if self.shape != (W, N):
            buf = np.empty(N + W * N, dtype=np.int64)
            self.payload, self.rows = buf[:N], buf[N:].reshape(W, N)
            self.payload_t, self.rows_t = torch.from_numpy(self.payload), torch.from_numpy(buf[N:])
            self.rows_ptr = native.address(self.rows)
            self.shape = (W, N)
        return self


def gather_step(counts_E: torch.Tensor, fingerprint: Fingerprint, group, *, tokens: int = 0,
                error: Optional[BaseException] = None, where: str = "bad input", landed: bool = True,
                version: int = 0, ahead_E: Optional[torch.Tensor] = None, ahead_version: int = 0,
                buffer: Optional[GatherBuffer] = None) -> Gathered:
    """All-gather every rank's counts, status, fingerprint, landing flag, weights version and
    lookahead counts; raise on every rank if any rank failed or the ranks disagree.

    The payload has ``HEADER + 2 * E`` entries on every rank whatever the step does, so ranks
    that disagree still exchange equal sizes (and are told so) instead of aborting the backend.

    Args:
        counts_E: int64 [E] routes per logical expert on this rank (zeros if ``error``): a
            tensor, whose device is the one every tensor of the collective lives on, or a NumPy
            array (host; what ``gating.count_routes`` returns there).
        fingerprint: what the ranks must agree on.
        tokens: tokens on this rank.
        error: an exception this rank hit before the collective, or None; ``where`` names the phase.
        landed: this rank has no replica transfer still in flight.
        version: version of this rank's home expert weights.
        ahead_E: int64 [E] predicted routes of the layer this one predicts (a tensor on the
            collective's device, or a NumPy array on the host), or None.
        ahead_version: version of that layer's home expert weights on this rank.
        buffer: the calling layer's ``GatherBuffer`` (host memory reused across its steps), or
            None for memory of this call's own.

    Raises:
        ReplicationError on every rank if any rank passed an error, or the fingerprints differ.
    """
    on_host = type(counts_E) is np.ndarray or counts_E.is_cpu
    E = counts_E.size if type(counts_E) is np.ndarray else counts_E.numel()
    code = failure_code(error, where) if error is not None else 0
    if ahead_E is not None and (ahead_E.size if type(ahead_E) is np.ndarray else ahead_E.numel()) != E:
        if code == 0:
            code = _CODE["replication policy"]
            error = ValueError(f"lookahead counts do not have one entry per expert of the layer ({E})")
        ahead_E = None
    head = (code, tokens, int(landed), version, ahead_version) + tuple(fingerprint)
    N = HEADER + 2 * E
    W = group_size(group)
    # NOTE: filled in place (no concatenation): this runs every layer, every step. On the host
    # through NumPy, in one buffer (payload and gathered rows; each torch or NumPy call costs
    # microseconds there); on a device with device copies.
    if on_host:
        mem = (GatherBuffer() if buffer is None else buffer).fit(W, N)
        host, out, out_ptr = mem.payload, mem.rows, mem.rows_ptr
        host[:HEADER] = head
        host[HEADER:HEADER + E] = _host_array(counts_E)
        if ahead_E is None:
            host[HEADER + E:] = 0
        else:
            host[HEADER + E:] = _host_array(ahead_E)
        if W == 1:
            out[0] = host
        else:
            dist.all_gather_into_tensor(mem.rows_t, mem.payload_t, group=group)
    else:
        device = counts_E.device
        payload = torch.empty(N, dtype=torch.int64, device=device)
        payload[:HEADER].copy_(torch.tensor(head, dtype=torch.int64))
        payload[HEADER:HEADER + E].copy_(torch.as_tensor(counts_E).reshape(-1))
        if ahead_E is None:
            payload[HEADER + E:].zero_()
        else:
            payload[HEADER + E:].copy_(torch.as_tensor(ahead_E).reshape(-1))
        if W == 1:
            out = payload.unsqueeze(0).cpu().numpy()
        else:
            gathered = torch.empty(W * N, dtype=torch.int64, device=device)
            dist.all_gather_into_tensor(gathered, payload, group=group)
            out = gathered.view(W, -1).cpu().numpy()
        out_ptr = native.address(out)
    sums = native.gather_sums(out, HEADER, _HEAD, HEADER, E, ahead=ahead_E is not None, ptr=out_ptr)
    if sums is None:  # the NumPy twin
        prints = out[:, _HEAD:HEADER]
        flags = int(out[:, 0].any()) | 2 * int((prints != prints[0]).any())
        sums = (flags, out[:, HEADER:HEADER + E].sum(axis=0),
                out[:, HEADER + E:].sum(axis=0) if ahead_E is not None else np.zeros(E, dtype=np.int64))
    flags, total_E, ahead_total_E = sums
    if flags & 1:
        raise_failures(out[:, 0], error, group_rank(group))
    if flags & 2:
        _raise_disagreement(out[:, _HEAD:HEADER], group_rank(group))
    return Gathered(out, E, total_E, ahead_total_E, out_ptr + 8 * HEADER)


def _host_array(counts) -> np.ndarray:
    """int64 [E] NumPy view of host counts (a NumPy array or a host tensor)."""
    if type(counts) is np.ndarray:
        return counts.reshape(-1)
    return counts.detach().cpu().numpy().reshape(-1)


def _raise_disagreement(prints_WF: np.ndarray, me: int) -> None:
    differ = np.nonzero((prints_WF != prints_WF[0]).any(axis=0))[0].tolist()
    names = list(Fingerprint.HINTS)
    parts = []
    for i in differ:
        values = prints_WF[:, i].tolist()
        shown = [_SITES.get(v, v) for v in values] if names[i] == "site" else values
        parts.append(f"{names[i]} ({', '.join(f'rank {r}: {v}' for r, v in enumerate(shown))}): "
                     f"{Fingerprint.HINTS[names[i]]}")
    raise ReplicationError(f"expert-parallel ranks disagree at this step (seen by rank {me}): " + "; ".join(parts))


class _AllToAll(torch.autograd.Function):
    """Uneven ``all_to_all_single``; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=list(recv),
                               input_split_sizes=list(send), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group) -> torch.Tensor:
    """Send ``send[r]`` leading rows of ``x`` (in rank order) to rank r; receive ``recv[r]`` from r."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, list(send), list(recv), group)
