"""The control path compiled: the per-step integer arithmetic of the split, the gathered-counts
bookkeeping and the prediction statistics, in C, with NumPy twins in ``split``, ``comm`` and ``hooks``.

Why: this runs on every rank, every layer, every step, on the critical path (docs/control_path.md).
Vectorised NumPy still costs about a microsecond per array call on a small CPU, and an int64
reduction over a [64, 256] matrix alone takes 20 microseconds there; the split's coordinate descent
needs a few dozen calls per class of experts per round. The same loops in C take a few microseconds.

The C source below is compiled once per machine with the system C compiler (``$CC``, default
``cc``) into ``$DS_MOE_REPLICATE_CACHE`` (default ``~/.cache/ds_moe_replicate``) and loaded with
``ctypes``; no build step, no new dependency. Where it cannot be built, the callers use their
NumPy twins, which give the same integers (``tests/test_split.py`` and ``tests/test_native.py``
check every result against them), so ranks that differ in this respect still agree.

Legend: W ranks, E logical experts, C slots per rank, P = W * C physical slots, X replicated
experts, R copies per expert at most.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["available", "split_into", "split_rank_into", "gather_sums", "count_into", "step_stats"]

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

/* Insertion sort: copy lists are short (R <= W). */
static void sort_small(i64 *a, i64 n) {
    for (i64 i = 1; i < n; i++) {
        i64 v = a[i], j = i - 1;
        while (j >= 0 && a[j] > v) { a[j + 1] = a[j]; j--; }
        a[j + 1] = v;
    }
}

static i64 ncopies(const i64 *sl, i64 R, i64 P) {
    i64 n = 0;
    while (n < R && sl[n] < P) n++;
    return n;
}

/* The quotas (see split._quotas): tokens each physical slot computes, from the totals per expert.
 * quota [P]: every entry written. Returns 0, or -1 without scratch memory. */
static int quotas_of(const i64 *total, i64 W, i64 E, i64 e_loc, i64 C, i64 X, i64 R, const i64 *rep_X,
                     const i64 *slot_XR, const i64 *rank_XR, const i64 *cls_rows, const i64 *cls_start,
                     i64 n_cls, i64 rounds, i64 *quota) {
    i64 P = W * C;
    i64 *home = calloc((size_t)W, sizeof(i64));
    i64 *load = calloc((size_t)W, sizeof(i64));
    i64 *base = calloc((size_t)R + 1, sizeof(i64));
    i64 *sorted = calloc((size_t)R + 1, sizeof(i64));
    i64 *fill = calloc((size_t)R + 1, sizeof(i64));
    int rc = -1;
    if (!home || !load || !base || !sorted || !fill) goto done;
    rc = 0;
    memset(quota, 0, (size_t)P * sizeof(i64));
    for (i64 e = 0; e < E; e++) {
        home[e / e_loc] += total[e];
        quota[(e / e_loc) * C + e % e_loc] = total[e];
    }
    if (X == 0) goto done;
    /* Even shares, the first copy takes the rounding rest. */
    memcpy(load, home, (size_t)W * sizeof(i64));
    for (i64 x = 0; x < X; x++) {
        const i64 *sl = slot_XR + x * R, *rk = rank_XR + x * R;
        i64 t = total[rep_X[x]], n = ncopies(sl, R, P);
        i64 even = t / n;
        load[rep_X[x] / e_loc] -= t;
        quota[(rep_X[x] / e_loc) * C + rep_X[x] % e_loc] = 0;
        for (i64 r = 0; r < n; r++) {
            i64 s = even + (r == 0 ? t - even * n : 0);
            quota[sl[r]] = s;
            load[rk[r]] += s;
        }
    }
    /* Coordinate descent over the classes (experts of a class share no rank). */
    for (i64 round = 0; round < rounds; round++) {
        int changed = 0;
        for (i64 c = 0; c < n_cls; c++) {
            for (i64 k = cls_start[c]; k < cls_start[c + 1]; k++) {
                i64 x = cls_rows[k];
                const i64 *sl = slot_XR + x * R, *rk = rank_XR + x * R;
                i64 t = total[rep_X[x]], n = ncopies(sl, R, P);
                for (i64 r = 0; r < n; r++) base[r] = sorted[r] = load[rk[r]] - quota[sl[r]];
                sort_small(sorted, n);
                i64 level = INT64_MAX, cum = 0;
                for (i64 m = 1; m <= n; m++) {
                    cum += sorted[m - 1];
                    i64 v = (t + cum) / m; /* non-negative: floor division */
                    if (v < level) level = v;
                }
                i64 sum = 0;
                for (i64 r = 0; r < n; r++) { fill[r] = level > base[r] ? level - base[r] : 0; sum += fill[r]; }
                i64 left = t - sum;
                for (i64 r = 0; r < n && left > 0; r++)
                    if (base[r] <= level) { fill[r]++; left--; }
                for (i64 r = 0; r < n; r++) {
                    if (quota[sl[r]] != fill[r]) changed = 1;
                    quota[sl[r]] = fill[r];
                    load[rk[r]] = base[r] + fill[r];
                }
            }
        }
        if (!changed) break;
    }
    i64 top = 0, top_home = 0;
    for (i64 w = 0; w < W; w++) {
        if (load[w] > top) top = load[w];
        if (home[w] > top_home) top_home = home[w];
    }
    if (top > top_home) {
        /* Never worse than no replication: everything home. */
        for (i64 x = 0; x < X; x++) {
            const i64 *sl = slot_XR + x * R;
            for (i64 r = 0; r < R && sl[r] < P; r++) quota[sl[r]] = 0;
            quota[(rep_X[x] / e_loc) * C + rep_X[x] % e_loc] = total[rep_X[x]];
        }
    }
done:
    free(home); free(load); free(base); free(sorted); free(fill);
    return rc;
}

/* One replicated expert's routes matched to its copies: the local copy first (prefer_local),
 * then the north-west corner rule (sources in rank order, copies in slot order). Each piece
 * (source i, copy j, amount a) is written where ``keep`` says: the dense split keeps all; the
 * per-rank split keeps the pieces this rank sends and those its slots receive. */
static void match(const i64 *counts, i64 stride, i64 Ws, i64 W, i64 C, i64 e, const i64 *sl, const i64 *rk, i64 n,
                  const i64 *quota, i64 prefer_local, i64 *rest, i64 *fill, i64 rank, i64 *send_dense,
                  i64 *send_P, i64 *recv_WC) {
    i64 P = W * C;
    for (i64 w = 0; w < Ws; w++) rest[w] = counts[w * stride + e];
    for (i64 r = 0; r < n; r++) fill[r] = quota[sl[r]];
#define PIECE(i, j, a) do { \
        if (send_dense) send_dense[(i) * P + sl[j]] += (a); \
        else { if ((i) == rank) send_P[sl[j]] += (a); \
               if (rk[j] == rank) recv_WC[(i) * C + sl[j] - rank * C] += (a); } } while (0)
    if (prefer_local && Ws == W) {
        for (i64 r = 0; r < n; r++) {
            i64 w = rk[r], take = rest[w] < fill[r] ? rest[w] : fill[r];
            if (take > 0) PIECE(w, r, take);
            rest[w] -= take;
            fill[r] -= take;
        }
    }
    i64 i = 0, j = 0;
    while (i < Ws && j < n) {
        if (rest[i] == 0) { i++; continue; }
        if (fill[j] == 0) { j++; continue; }
        i64 a = rest[i] < fill[j] ? rest[i] : fill[j];
        PIECE(i, j, a);
        rest[i] -= a;
        fill[j] -= a;
    }
#undef PIECE
}

/* See split.transport_numpy: the same steps, in the same order, in the same integers.
 * counts [Ws, E] (Ws source rows: W in the split, any number for quotas alone); slot_XR /
 * rank_XR [X, R] (padding: slot P); cls_rows the rows of X class by class, cls_start [n_cls + 1];
 * send [Ws, P] (or NULL: quotas alone) and quota [P]: every entry is written. Returns 0, or -1
 * if scratch memory could not be had. */
int ds_split(const i64 *counts, i64 Ws, i64 W, i64 E, i64 e_loc, i64 C, i64 X, i64 R,
             const i64 *rep_X, const i64 *slot_XR, const i64 *rank_XR,
             const i64 *cls_rows, const i64 *cls_start, i64 n_cls, i64 rounds, i64 prefer_local,
             i64 *send, i64 *quota) {
    i64 P = W * C;
    i64 *total = calloc((size_t)E, sizeof(i64));
    i64 *rest = calloc((size_t)(Ws > W ? Ws : W), sizeof(i64));
    i64 *fill = calloc((size_t)R + 1, sizeof(i64));
    int rc = -1;
    if (!total || !rest || !fill) goto done;
    for (i64 w = 0; w < Ws; w++)
        for (i64 e = 0; e < E; e++) total[e] += counts[w * E + e];
    rc = quotas_of(total, W, E, e_loc, C, X, R, rep_X, slot_XR, rank_XR, cls_rows, cls_start, n_cls, rounds, quota);
    if (rc != 0 || !send) goto done;
    /* Every route home, rank by rank (replicated experts' home columns are overwritten below). */
    for (i64 w = 0; w < Ws; w++) {
        const i64 *src = counts + w * E;
        i64 *dst = send + w * P;
        for (i64 h = 0; h < W; h++) {
            memcpy(dst + h * C, src + h * e_loc, (size_t)e_loc * sizeof(i64));
            memset(dst + h * C + e_loc, 0, (size_t)(C - e_loc) * sizeof(i64));
        }
    }
    for (i64 x = 0; x < X; x++) {
        const i64 *sl = slot_XR + x * R, *rk = rank_XR + x * R;
        i64 e = rep_X[x], hs = (e / e_loc) * C + e % e_loc;
        for (i64 w = 0; w < Ws; w++) send[w * P + hs] = 0;
        match(counts, E, Ws, W, C, e, sl, rk, ncopies(sl, R, P), quota, prefer_local, rest, fill, -1, send,
              NULL, NULL);
    }
done:
    free(total); free(rest); free(fill);
    return rc;
}

/* The split as one rank needs it: the routes it sends to each slot (send_P [P]), the routes its
 * slots receive from each rank (recv_WC [W, C]) and every slot's quota (quota [P]); the same
 * integers as the rows and columns of ds_split. total [E]: counts summed over the W rows. */
int ds_split_rank(const i64 *counts, i64 stride, const i64 *total, i64 W, i64 E, i64 e_loc, i64 C,
                  const i64 *lay, i64 rounds, i64 prefer_local, i64 rank, i64 *out) {
    /* lay: X, R and the addresses of rep_X, slot_XR, rank_XR, cls_rows, cls_start, then n_cls
     * (split._Layout.native_block); out: send_P [P], recv_WC [W, C], quota [P] one after the other;
     * counts: row w starts at counts + w * stride. */
    i64 P = W * C, X = lay[0], R = lay[1], n_cls = lay[7];
    const i64 *rep_X = (const i64 *)(intptr_t)lay[2], *slot_XR = (const i64 *)(intptr_t)lay[3],
              *rank_XR = (const i64 *)(intptr_t)lay[4], *cls_rows = (const i64 *)(intptr_t)lay[5],
              *cls_start = (const i64 *)(intptr_t)lay[6];
    i64 *send_P = out, *recv_WC = out + P, *quota = out + P + W * C;
    i64 *rest = calloc((size_t)W, sizeof(i64));
    i64 *fill = calloc((size_t)R + 1, sizeof(i64));
    char *rep = calloc((size_t)E, 1);
    int rc = -1;
    if (!rest || !fill || !rep) goto done;
    rc = quotas_of(total, W, E, e_loc, C, X, R, rep_X, slot_XR, rank_XR, cls_rows, cls_start, n_cls, rounds, quota);
    if (rc != 0) goto done;
    for (i64 x = 0; x < X; x++) rep[rep_X[x]] = 1;
    memset(send_P, 0, (size_t)P * sizeof(i64));
    memset(recv_WC, 0, (size_t)(W * C) * sizeof(i64));
    const i64 *mine = counts + rank * stride;
    for (i64 e = 0; e < E; e++)
        if (!rep[e]) send_P[(e / e_loc) * C + e % e_loc] = mine[e];
    for (i64 j = 0; j < e_loc; j++) {
        i64 e = rank * e_loc + j;
        if (rep[e]) continue;
        for (i64 w = 0; w < W; w++) recv_WC[w * C + j] = counts[w * stride + e];
    }
    for (i64 x = 0; x < X; x++) {
        const i64 *sl = slot_XR + x * R, *rk = rank_XR + x * R;
        match(counts, stride, W, W, C, rep_X[x], sl, rk, ncopies(sl, R, P), quota, prefer_local, rest, fill, rank,
              NULL, send_P, recv_WC);
    }
done:
    free(rest); free(fill); free(rep);
    return rc;
}

/* The step's gathered buffer [W, N] (N = head + 2E: header, counts, lookahead counts): sums of
 * the counts and of the lookahead counts over ranks; returns 1 if a rank reported a failure
 * (column 0), plus 2 if the fingerprint columns [fp_lo, fp_hi) differ between ranks. */
int ds_gather(const i64 *buf, i64 W, i64 N, i64 head, i64 fp_lo, i64 fp_hi, i64 E, i64 ahead, i64 *sum_E,
              i64 *ahead_E) {
    /* ahead: 0 = the lookahead section is not read (ahead_E is left as zeros). */
    int flags = 0;
    memset(sum_E, 0, (size_t)E * sizeof(i64));
    memset(ahead_E, 0, (size_t)E * sizeof(i64));
    for (i64 w = 0; w < W; w++) {
        const i64 *row = buf + w * N;
        if (row[0] != 0) flags |= 1;
        for (i64 f = fp_lo; f < fp_hi; f++)
            if (row[f] != buf[f]) flags |= 2;
        for (i64 e = 0; e < E; e++) sum_E[e] += row[head + e];
        if (ahead)
            for (i64 e = 0; e < E; e++) ahead_E[e] += row[head + E + e];
    }
    return flags;
}

/* Taken routes per expert: entries of routes [n] in [0, E) counted into out [E] (-1 = not taken). */
void ds_count(const i64 *routes, i64 n, i64 E, i64 *out) {
    memset(out, 0, (size_t)E * sizeof(i64));
    for (i64 i = 0; i < n; i++) {
        i64 e = routes[i];
        if (e >= 0 && e < E) out[e]++;
    }
}

/* hooks.step_stats in one pass: rank_W [W] = quota summed per rank; out [4] = balancedness (mean /
 * max of rank_W, 1 when nothing was computed), dropped routes (sum of total - sum of quota), and,
 * with pred (may be NULL: NaN), prediction_quality's L1 and recall. */
void ds_prediction_quality(const double *pred, const i64 *act, i64 E, i64 W, double *out);
void ds_step_stats(const i64 *quota, i64 W, i64 C, const i64 *total, i64 E, const double *pred, i64 *rank_W,
                   double *out) {
    i64 top = 0, sum = 0, routes = 0;
    for (i64 w = 0; w < W; w++) {
        i64 r = 0;
        for (i64 c = 0; c < C; c++) r += quota[w * C + c];
        rank_W[w] = r;
        sum += r;
        if (r > top) top = r;
    }
    for (i64 e = 0; e < E; e++) routes += total[e];
    out[0] = top > 0 ? ((double)sum / (double)W) / (double)top : 1.0;
    out[1] = (double)(routes - sum);
    if (pred) ds_prediction_quality(pred, total, E, W, out + 2);
    else out[2] = out[3] = __builtin_nan("");
}

/* The L1 distance between predicted and actual load shares, and the recall of the hot experts
 * (actual share above 1 / W): hooks.prediction_quality is its twin. out [2]. */
void ds_prediction_quality(const double *pred, const i64 *act, i64 E, i64 W, double *out) {
    double ps = 0.0, as = 0.0, l1 = 0.0;
    for (i64 e = 0; e < E; e++) { ps += pred[e]; as += (double)act[e]; }
    i64 hot = 0, found = 0;
    for (i64 e = 0; e < E; e++) {
        double p = ps > 0 ? pred[e] / ps : 1.0 / (double)E;
        double a = as > 0 ? (double)act[e] / as : 1.0 / (double)E;
        l1 += p > a ? p - a : a - p;
        if (a > 1.0 / (double)W) { hot++; if (p > 1.0 / (double)W) found++; }
    }
    out[0] = l1;
    out[1] = hot ? (double)found / (double)hot : 1.0;
}
"""


def _cache_dir() -> Path:
    return Path(os.environ.get("DS_MOE_REPLICATE_CACHE", Path.home() / ".cache" / "ds_moe_replicate"))


# NOTE: no -march=native: the cache directory may be shared by machines of different CPUs.
_FLAGS = ("-O3", "-shared", "-fPIC")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "ds_split": [_PTR] + [_I64] * 7 + [_PTR] * 5 + [_I64] * 3 + [_PTR] * 2,
    "ds_split_rank": [_PTR, _I64, _PTR] + [_I64] * 4 + [_PTR] + [_I64] * 3 + [_PTR],
    "ds_gather": [_PTR] + [_I64] * 7 + [_PTR] * 2,
    "ds_count": [_PTR] + [_I64] * 2 + [_PTR],
    "ds_step_stats": [_PTR] + [_I64] * 2 + [_PTR, _I64, _PTR, _PTR, _PTR],
}


@functools.lru_cache(maxsize=1)
def _library():
    """The loaded library, built on first use; None where it cannot be built or loaded."""
    digest = hashlib.sha1((_SOURCE + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    lib_path = _cache_dir() / f"control_{digest}.so"
    try:
        if not lib_path.exists():
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            # NOTE: built in a private directory and renamed into place, so ranks that build at
            # the same moment never load a half-written library.
            with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
                src, out = Path(tmp) / "control.c", Path(tmp) / "control.so"
                src.write_text(_SOURCE)
                subprocess.run([os.environ.get("CC", "cc"), *_FLAGS, "-o", str(out), str(src)],
                               check=True, capture_output=True, timeout=120)
                os.replace(out, lib_path)
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, subprocess.SubprocessError):
        return None
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = None if name in ("ds_count", "ds_step_stats") else ctypes.c_int
    return lib


def available() -> bool:
    """True if the compiled control path can be used on this machine."""
    return _library() is not None


def _checked(rc: int) -> None:
    if rc != 0:
        raise MemoryError("the compiled split could not allocate its scratch memory")


def split_into(counts_WE: np.ndarray, lay, W: int, C: int, e_loc: int, rounds: int, prefer_local: bool,
               send_WP, quota_P: np.ndarray) -> bool:
    """Fill ``send_WP`` (int64 [rows of counts_WE, P], or None for the quotas alone) and
    ``quota_P`` (int64 [P]), every entry, for the layout ``lay`` (``split._Layout``); False if
    the compiled split is not available. ``counts_WE`` has W rows for the split; any number of
    rows (their sum is what counts) for the quotas alone, with ``prefer_local`` off."""
    lib = _library()
    if lib is None:
        return False
    counts = np.ascontiguousarray(counts_WE, dtype=np.int64)
    if counts.ndim != 2 or (send_WP is not None and send_WP.shape != (counts.shape[0], W * C)) \
            or quota_P.shape != (W * C,):
        raise ValueError(f"counts {counts.shape}, send {None if send_WP is None else send_WP.shape} and quota "
                         f"{quota_P.shape} do not fit W={W}, C={C}")
    _checked(lib.ds_split(counts.ctypes.data, counts.shape[0], W, counts.shape[1], e_loc, C, *lay.native_args,
                          rounds, int(prefer_local), None if send_WP is None else send_WP.ctypes.data,
                          quota_P.ctypes.data))
    return True


def split_rank_into(counts_WE: np.ndarray, total_E: np.ndarray, lay, rank: int, C: int, e_loc: int, rounds: int,
                    prefer_local: bool, out: np.ndarray) -> bool:
    """The split as rank ``rank`` needs it (``split.transport_rank``): fill ``out`` (int64 [2P + W*C]:
    send_P [P], recv_WC [W, C], quota_P [P]), every entry. ``counts_WE``: int64 [W, E] with
    contiguous rows (a view into the gathered buffer is fine); ``total_E``: int64 contiguous, its
    column sums. False if the library is not available."""
    lib = _library()
    if lib is None:
        return False
    W, E = counts_WE.shape
    _checked(lib.ds_split_rank(counts_WE.ctypes.data, counts_WE.strides[0] // 8, total_E.ctypes.data, W, E, e_loc,
                               C, lay.native_block_ptr, rounds, int(prefer_local), rank, out.ctypes.data))
    return True


def gather_sums(buf_WN: np.ndarray, head: int, fp_lo: int, fp_hi: int, E: int, ahead: bool = True):
    """(flags, counts summed over ranks [E], lookahead counts summed [E]) of the step's gathered
    int64 C-contiguous [W, head + 2E] buffer; flags: 1 = a rank reported a failure (column 0),
    2 = the fingerprint columns [fp_lo, fp_hi) differ. Without ``ahead`` the lookahead section is
    not read (zeros). None if the library is not available."""
    lib = _library()
    if lib is None:
        return None
    sums = np.empty(2 * E, dtype=np.int64)
    W, N = buf_WN.shape
    at = sums.ctypes.data
    flags = lib.ds_gather(buf_WN.ctypes.data, W, N, head, fp_lo, fp_hi, E, int(ahead), at, at + 8 * E)
    return flags, sums[:E], sums[E:]


def count_into(routes_ptr: int, n: int, num_experts: int, out_ptr: int) -> bool:
    """Count the n int64 routes at address ``routes_ptr`` (values in [0, E); -1 = not taken) into
    the int64 [E] at ``out_ptr`` (``gating.count_routes`` on the host); False without the library."""
    lib = _library()
    if lib is None:
        return False
    lib.ds_count(routes_ptr, n, num_experts, out_ptr)
    return True


def step_stats(quota_P: np.ndarray, W: int, total_E: np.ndarray, pred_E):
    """(rank loads int64 [W], balancedness, dropped routes, prediction L1, hot recall) for
    ``hooks.step_stats``: ``quota_P`` int64 C-contiguous [P = W * C]; ``total_E`` int64
    C-contiguous [E]; ``pred_E`` float64 C-contiguous [E] or None (L1 and recall NaN). None if
    the library is not available."""
    lib = _library()
    if lib is None:
        return None
    rank_W = np.empty(W, dtype=np.int64)
    out = np.empty(4, dtype=np.float64)
    lib.ds_step_stats(quota_P.ctypes.data, W, quota_P.size // W, total_E.ctypes.data, total_E.size,
                      None if pred_E is None else pred_E.ctypes.data, rank_W.ctypes.data, out.ctypes.data)
    return rank_W, float(out[0]), int(out[1]), float(out[2]), float(out[3])
