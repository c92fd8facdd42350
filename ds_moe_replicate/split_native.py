"""The split compiled: the same integer arithmetic as ``split.transport_numpy``, in C.

Why: the split runs on every rank, every layer, every step, on the critical path. Vectorised
NumPy still costs one Python-level call (about a microsecond on a small CPU) per array operation,
and the coordinate descent needs a few dozen of them per class of experts per round, so at
E = 256, W = 64 the NumPy twin takes a few hundred microseconds. The same loops in C take a few
microseconds; what remains is the dense [W, P] result.

The C source below is compiled once per machine with the system C compiler (``$CC``, default
``cc``) into ``$DS_MOE_REPLICATE_CACHE`` (default ``~/.cache/ds_moe_replicate``) and loaded with
``ctypes``; no build step, no new dependency. Where it cannot be built, ``split`` uses the NumPy
twin, which gives the same integers (``tests/test_split.py`` checks every result against it), so
ranks that differ in this respect still agree.

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

__all__ = ["available", "split_into"]

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

/* See split.transport_numpy: the same steps, in the same order, in the same integers.
 * counts [Ws, E] (Ws source rows: W in the split, any number for quotas alone); slot_XR /
 * rank_XR [X, R] (padding: slot P); cls_rows the rows of X class by class, cls_start [n_cls + 1];
 * send [Ws, P] and quota [P]: every entry is written (no need to zero them first). Returns 0, or -1 if
 * scratch memory could not be had. */
int ds_split(const i64 *counts, i64 Ws, i64 W, i64 E, i64 e_loc, i64 C, i64 X, i64 R,
             const i64 *rep_X, const i64 *slot_XR, const i64 *rank_XR,
             const i64 *cls_rows, const i64 *cls_start, i64 n_cls, i64 rounds, i64 prefer_local,
             i64 *send, i64 *quota) {
    i64 P = W * C;
    i64 *total = calloc((size_t)E, sizeof(i64));
    i64 *home = calloc((size_t)W, sizeof(i64));
    i64 *load = calloc((size_t)W, sizeof(i64));
    i64 *rest = calloc((size_t)(Ws > W ? Ws : W), sizeof(i64));
    i64 *base = calloc((size_t)R + 1, sizeof(i64));
    i64 *sorted = calloc((size_t)R + 1, sizeof(i64));
    i64 *fill = calloc((size_t)R + 1, sizeof(i64));
    char *rep = calloc((size_t)E, 1);
    int rc = -1;
    if (!total || !home || !load || !rest || !base || !sorted || !fill || !rep) goto done;
    rc = 0;
    memset(quota, 0, (size_t)P * sizeof(i64));
    for (i64 w = 0; w < Ws; w++)
        for (i64 e = 0; e < E; e++) total[e] += counts[w * E + e];
    for (i64 e = 0; e < E; e++) home[e / e_loc] += total[e];
    for (i64 x = 0; x < X; x++) rep[rep_X[x]] = 1;
    /* Experts with one copy: every route home, rank by rank, home expert by home expert, replica
     * slots zero: one pass over send in order (replicated experts' columns are set below). */
    for (i64 e = 0; e < E; e++)
        if (!rep[e]) quota[(e / e_loc) * C + e % e_loc] = total[e];
    for (i64 w = 0; w < Ws; w++) {
        const i64 *src = counts + w * E;
        i64 *dst = send + w * P;
        for (i64 h = 0; h < W; h++) {
            memcpy(dst + h * C, src + h * e_loc, (size_t)e_loc * sizeof(i64));
            memset(dst + h * C + e_loc, 0, (size_t)(C - e_loc) * sizeof(i64));
        }
    }
    if (X == 0) goto done;
    /* Even shares, the first copy takes the rounding rest. */
    memcpy(load, home, (size_t)W * sizeof(i64));
    for (i64 x = 0; x < X; x++) {
        const i64 *sl = slot_XR + x * R, *rk = rank_XR + x * R;
        i64 t = total[rep_X[x]], n = 0;
        while (n < R && sl[n] < P) n++;
        i64 even = t / n;
        load[rep_X[x] / e_loc] -= t;
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
                i64 t = total[rep_X[x]], n = 0;
                while (n < R && sl[n] < P) n++;
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
    /* Routes: the local copy first, then the north-west corner rule (sources in rank order,
     * copies in slot order). */
    for (i64 x = 0; x < X; x++) {
        const i64 *sl = slot_XR + x * R, *rk = rank_XR + x * R;
        i64 e = rep_X[x], n = 0, hs = (e / e_loc) * C + e % e_loc;
        while (n < R && sl[n] < P) n++;
        for (i64 w = 0; w < Ws; w++) { rest[w] = counts[w * E + e]; send[w * P + hs] = 0; }
        for (i64 r = 0; r < n; r++) fill[r] = quota[sl[r]];
        if (prefer_local && Ws == W) {
            for (i64 r = 0; r < n; r++) {
                i64 w = rk[r], take = rest[w] < fill[r] ? rest[w] : fill[r];
                send[w * P + sl[r]] = take;
                rest[w] -= take;
                fill[r] -= take;
            }
        }
        i64 i = 0, j = 0;
        while (i < Ws && j < n) {
            if (rest[i] == 0) { i++; continue; }
            if (fill[j] == 0) { j++; continue; }
            i64 a = rest[i] < fill[j] ? rest[i] : fill[j];
            send[i * P + sl[j]] += a;
            rest[i] -= a;
            fill[j] -= a;
        }
    }
done:
    free(total); free(home); free(load); free(rest); free(base); free(sorted); free(fill); free(rep);
    return rc;
}
"""


def _cache_dir() -> Path:
    return Path(os.environ.get("DS_MOE_REPLICATE_CACHE", Path.home() / ".cache" / "ds_moe_replicate"))


@functools.lru_cache(maxsize=1)
def _function():
    """The loaded ``ds_split``, built on first use; None where it cannot be built or loaded."""
    digest = hashlib.sha1(_SOURCE.encode()).hexdigest()[:16]
    lib_path = _cache_dir() / f"split_{digest}.so"
    try:
        if not lib_path.exists():
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            # NOTE: built in a private directory and renamed into place, so ranks that build at
            # the same moment never load a half-written library.
            with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
                src, out = Path(tmp) / "split.c", Path(tmp) / "split.so"
                src.write_text(_SOURCE)
                subprocess.run([os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", "-o", str(out), str(src)],
                               check=True, capture_output=True, timeout=120)
                os.replace(out, lib_path)
        fn = ctypes.CDLL(str(lib_path)).ds_split
    except (OSError, subprocess.SubprocessError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 7 + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + \
        [ctypes.c_void_p] * 2
    return fn


def available() -> bool:
    """True if the compiled split can be used on this machine."""
    return _function() is not None


def split_into(counts_WE: np.ndarray, lay, W: int, C: int, e_loc: int, rounds: int, prefer_local: bool,
               send_WP: np.ndarray, quota_P: np.ndarray) -> bool:
    """Fill ``send_WP`` (int64 [rows of counts_WE, P]) and ``quota_P`` (int64 [P]), every entry,
    for the layout ``lay`` (``split._Layout``); False if the compiled split is not available.
    ``counts_WE`` has W rows for the split; any number of rows (their sum is what counts) for the
    quotas alone, with ``prefer_local`` off."""
    fn = _function()
    if fn is None:
        return False
    counts = np.ascontiguousarray(counts_WE, dtype=np.int64)
    if counts.ndim != 2 or send_WP.shape != (counts.shape[0], W * C) or quota_P.shape != (W * C,):
        raise ValueError(f"counts {counts.shape}, send {send_WP.shape} and quota {quota_P.shape} do not fit "
                         f"W={W}, C={C}")
    rc = fn(counts.ctypes.data, counts.shape[0], W, counts.shape[1], e_loc, C, *lay.native_args, rounds,
            int(prefer_local), send_WP.ctypes.data, quota_P.ctypes.data)
    if rc != 0:
        raise MemoryError("the compiled split could not allocate its scratch memory")
    return True
