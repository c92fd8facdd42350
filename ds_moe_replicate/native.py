"""The control path compiled: the per-step integer arithmetic of the split, the gathered-counts
bookkeeping, the prediction statistics, the incremental re-plan and what a new placement needs
(its slot lists, its split layout, the replicas' validity), in C, with NumPy twins in ``split``,
``comm``, ``hooks``, ``replan``, ``placement`` and ``replicas``.

Why: this runs on every rank, every layer, every step, on the critical path (docs/control_path.md).
Vectorised NumPy still costs about a microsecond per array call on a small CPU, and an int64
reduction over a [64, 256] matrix alone takes 20 microseconds there; the split's coordinate descent
needs a few dozen calls per class of experts per round. The same loops in C take a few microseconds.

The C source below is compiled once per machine with the system C compiler (``$CC``, default
``cc``) into ``$DS_MOE_REPLICATE_CACHE`` (default ``~/.cache/ds_moe_replicate``) and loaded with
``ctypes``; no build step, no new dependency. Where it cannot be built, the callers use their
NumPy twins, which give the same integers (``tests/test_split.py``, ``tests/test_native.py``,
``tests/test_replan.py`` and ``tests/test_replicas.py`` check every result against them), so ranks
that differ in this respect still agree. The same holds for a call whose scratch memory could not
be had: it answers "not available" and its caller runs the twin, rather than raising on one rank
while the others go on into the next collective.

Legend: W ranks, E logical experts, C slots per rank, P = W * C physical slots, X replicated
experts, R copies per expert at most.
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["available", "split_into", "split_rank_into", "gather_sums", "count_into", "step_stats", "layout_of",
           "replan_into", "log2phy_of", "valid_slots"]

_SOURCE = r"""
#include <math.h>
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

/* Integer water-filling of one expert's t tokens over its n copies, given the other loads base [n]
 * of their ranks: the largest level L with sum max(0, L - base) <= t is the minimum over m of
 * floor((t + the m lowest bases) / m); every copy is filled up to L, and the rest (fewer tokens
 * than copies at the level) goes one each to the copies at the level (base <= L), in copy order.
 * fill [n] out; sorted [n] scratch. The same rule as planner._water_fill_int and split._quotas. */
static void water_int(const i64 *base, i64 n, i64 t, i64 *sorted, i64 *fill) {
    for (i64 r = 0; r < n; r++) sorted[r] = base[r];
    sort_small(sorted, n);
    /* The level over the m lowest copies, (t + their bases) / m, falls while the next base lies
     * below it and never falls again after that (it would have to pass a base it lies below), so
     * the first m whose next base is not below it gives the minimum: one division, not n. */
    i64 m = 1, cum = n > 0 ? sorted[0] : 0;
    while (m < n && (__int128)sorted[m] * m < (__int128)(t + cum)) { cum += sorted[m]; m++; }
    i64 level = n > 0 ? (t + cum) / m : 0; /* non-negative: floor division */
    i64 sum = 0;
    for (i64 r = 0; r < n; r++) { fill[r] = level > base[r] ? level - base[r] : 0; sum += fill[r]; }
    i64 left = t - sum;
    for (i64 r = 0; r < n && left > 0; r++)
        if (base[r] <= level) { fill[r]++; left--; }
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
    (void)E;
    for (i64 h = 0, e = 0; h < W; h++) { /* NOTE: no division per expert (tens of cycles each) */
        i64 sum = 0;
        for (i64 j = 0; j < e_loc; j++, e++) { sum += total[e]; quota[h * C + j] = total[e]; }
        home[h] = sum;
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
                for (i64 r = 0; r < n; r++) base[r] = load[rk[r]] - quota[sl[r]];
                water_int(base, n, t, sorted, fill);
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
static int split_impl(const i64 *counts, i64 Ws, i64 W, i64 E, i64 e_loc, i64 C, i64 X, i64 R,
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
static int split_rank_impl(const i64 *counts, i64 stride, const i64 *total, i64 W, i64 E, i64 e_loc, i64 C,
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
    for (i64 h = 0, e = 0; h < W; h++)
        for (i64 j = 0; j < e_loc; j++, e++)
            if (!rep[e]) send_P[h * C + j] = mine[e];
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

/* The compiled half of a placement's split layout (split._Layout): the replicated experts rep_X [X]
 * (ascending), their copies' slots and ranks slot_XR / rank_XR [X, R] (ascending slot order,
 * padding P / W) and the classes: experts with more copies first (ties: lower expert first), each
 * joins the first class none of whose ranks it touches; cls_rows [X] lists every class's rows in
 * ascending order, class after class, cls_start [X + 1] where each class starts. phy [W * C];
 * cnt [E] copies per expert; X and R as counted from cnt. Returns the number of classes, or -1
 * without scratch memory. split._layout_numpy is its twin. */
static i64 layout_impl(const i64 *phy, i64 W, i64 C, i64 E, const i64 *cnt, i64 X, i64 R, i64 *rep_X, i64 *slot_XR,
              i64 *rank_XR, i64 *cls_rows, i64 *cls_start) {
    i64 P = W * C, n_cls = 0;
    i64 *row_of = malloc((size_t)(E > 0 ? E : 1) * sizeof(i64));
    i64 *pos = calloc((size_t)X + 1, sizeof(i64));
    i64 *cls_of = calloc((size_t)X + 1, sizeof(i64));
    i64 *size = calloc((size_t)X + 1, sizeof(i64));
    char *used = calloc((size_t)(X > 0 ? X : 1) * (size_t)W, 1);
    if (!row_of || !pos || !cls_of || !size || !used) { n_cls = -1; goto done; }
    for (i64 e = 0, x = 0; e < E; e++) {
        row_of[e] = cnt[e] > 1 ? x : -1;
        if (cnt[e] > 1) rep_X[x++] = e;
    }
    for (i64 i = 0; i < X * R; i++) { slot_XR[i] = P; rank_XR[i] = W; }
    for (i64 w = 0, p = 0; w < W; w++)
        for (i64 c = 0; c < C; c++, p++) {
            i64 e = phy[p];
            if (e < 0 || row_of[e] < 0) continue;
            i64 x = row_of[e];
            slot_XR[x * R + pos[x]] = p;
            rank_XR[x * R + pos[x]] = w;
            pos[x]++;
        }
    /* Colouring, by copy count descending (a counting order: counts are at most R). */
    for (i64 k = R; k >= 2; k--)
        for (i64 x = 0; x < X; x++) {
            if (cnt[rep_X[x]] != k) continue;
            const i64 *rk = rank_XR + x * R;
            i64 c = 0;
            for (; c < n_cls; c++) {
                i64 r = 0;
                while (r < k && !used[c * W + rk[r]]) r++;
                if (r == k) break;
            }
            if (c == n_cls) n_cls++;
            for (i64 r = 0; r < k; r++) used[c * W + rk[r]] = 1;
            cls_of[x] = c;
            size[c]++;
        }
    cls_start[0] = 0;
    for (i64 c = 0; c < n_cls; c++) { cls_start[c + 1] = cls_start[c] + size[c]; size[c] = cls_start[c]; }
    for (i64 x = 0; x < X; x++) cls_rows[size[cls_of[x]]++] = x;
done:
    free(row_of); free(pos); free(cls_of); free(size); free(used);
    return n_cls;
}

/* The split layout of phy as quotas_of reads it, in memory of its own (lay_free releases it). */
typedef struct { i64 X, R, n_cls; i64 *rep_X, *slot_XR, *rank_XR, *cls_rows, *cls_start, *cnt; } layout_t;

static void lay_free(layout_t *L) {
    free(L->rep_X); free(L->slot_XR); free(L->rank_XR); free(L->cls_rows); free(L->cls_start); free(L->cnt);
    memset(L, 0, sizeof(*L));
}

static int lay_build(const i64 *phy, i64 W, i64 C, i64 E, layout_t *L) {
    memset(L, 0, sizeof(*L));
    L->cnt = calloc((size_t)E + 1, sizeof(i64));
    if (!L->cnt) return -1;
    for (i64 p = 0; p < W * C; p++) if (phy[p] >= 0) L->cnt[phy[p]]++;
    L->R = 1;
    for (i64 e = 0; e < E; e++) {
        if (L->cnt[e] > 1) L->X++;
        if (L->cnt[e] > L->R) L->R = L->cnt[e];
    }
    i64 X = L->X, R = L->R;
    L->rep_X = malloc((size_t)(X + 1) * sizeof(i64));
    L->slot_XR = malloc((size_t)(X * R + 1) * sizeof(i64));
    L->rank_XR = malloc((size_t)(X * R + 1) * sizeof(i64));
    L->cls_rows = malloc((size_t)(X + 1) * sizeof(i64));
    L->cls_start = malloc((size_t)(X + 2) * sizeof(i64));
    if (!L->rep_X || !L->slot_XR || !L->rank_XR || !L->cls_rows || !L->cls_start) { lay_free(L); return -1; }
    L->n_cls = layout_impl(phy, W, C, E, L->cnt, X, R, L->rep_X, L->slot_XR, L->rank_XR, L->cls_rows, L->cls_start);
    if (L->n_cls < 0) { lay_free(L); return -1; }
    return 0;
}

/* quota [P] of tokens on placement phy (its layout built here). */
static int quotas_on(const i64 *tokens, const i64 *phy, i64 W, i64 E, i64 e_loc, i64 C, i64 rounds, i64 *quota) {
    layout_t L;
    if (lay_build(phy, W, C, E, &L) != 0) return -1;
    int rc = quotas_of(tokens, W, E, e_loc, C, L.X, L.R, L.rep_X, L.slot_XR, L.rank_XR, L.cls_rows, L.cls_start,
                       L.n_cls, rounds, quota);
    lay_free(&L);
    return rc;
}

static i64 rank_max(const i64 *quota, i64 W, i64 C, i64 *rank_W) {
    i64 top = 0;
    for (i64 w = 0; w < W; w++) {
        i64 r = 0;
        for (i64 c = 0; c < C; c++) r += quota[w * C + c];
        if (rank_W) rank_W[w] = r;
        if (r > top) top = r;
    }
    return top;
}

/* replan.replan compiled: the same steps as its NumPy twin (replan._replan_numpy), in the same
 * integers and the same double comparisons. load [E] (rounded to whole tokens: tokens [E] out);
 * prev_phy [P] and prev_lay (split._Layout.native_block of the previous placement); out_phy [P]
 * the new slot table (a copy of prev_phy when kept), out_quota [P] the run-time split's quotas of
 * tokens on it; info [4] out: status (0 previous kept, 1 replicas dropped, 2 replicas added, 3 home
 * placement), the largest rank load with every expert home, the largest on the new placement, the
 * tokens' sum. Returns 0, -1 without scratch memory, -2 if a load is negative, not finite or above
 * 2**53. */
static int replan_impl(const double *load, i64 W, i64 e_loc, i64 S, const i64 *prev_phy, const i64 *prev_lay, i64 rounds,
              double keep, double target, i64 *tokens, i64 *out_phy, i64 *out_quota, i64 *info) {
    i64 E = W * e_loc, C = e_loc + S, P = W * C, sum = 0, home_max = 0;
    for (i64 e = 0; e < E; e++) {
        if (!(load[e] >= 0.0 && load[e] <= 9007199254740992.0)) return -2;
        tokens[e] = (i64)rint(load[e]);
        sum += tokens[e];
    }
    for (i64 w = 0, e = 0; w < W; w++) {
        i64 h = 0;
        for (i64 j = 0; j < e_loc; j++, e++) h += tokens[e];
        if (h > home_max) home_max = h;
    }
    info[1] = home_max;
    info[3] = sum;
    double mean = (double)sum / (double)W;
    memcpy(out_phy, prev_phy, (size_t)P * sizeof(i64));
    if (W == 1 || S == 0 || mean <= 0.0) {
        for (i64 w = 0, e = 0; w < W; w++)
            for (i64 c = 0; c < C; c++) {
                out_phy[w * C + c] = c < e_loc ? e : -1;
                out_quota[w * C + c] = c < e_loc ? tokens[e] : 0;
                if (c < e_loc) e++;
            }
        info[0] = 3;
        info[2] = home_max;
        return 0;
    }
    double stop = mean / target;
    i64 *rank_W = malloc((size_t)W * sizeof(i64));
    i64 *need = malloc((size_t)E * sizeof(i64));
    i64 *seen = calloc((size_t)E, sizeof(i64));
    i64 *ncop = calloc((size_t)E, sizeof(i64));
    i64 *base = malloc((size_t)(W + 1) * sizeof(i64));
    i64 *sorted = malloc((size_t)(W + 1) * sizeof(i64));
    i64 *fill = malloc((size_t)(W + 1) * sizeof(i64));
    /* NOTE: int32 slots: at E = 256, W = 64 the table stays under the allocator's 128 KiB
     * threshold, above which every call would map fresh pages and fault on each. */
    int32_t *cop = malloc((size_t)E * (size_t)W * sizeof(int32_t) + sizeof(int32_t));
    i64 *free_W = malloc((size_t)W * sizeof(i64));
    char *holds = calloc((size_t)W, 1);
    int32_t *slot_rank = malloc((size_t)P * sizeof(int32_t));
    int rc = -1;
    if (!rank_W || !need || !seen || !ncop || !base || !sorted || !fill || !cop || !free_W || !holds || !slot_rank)
        goto done;
    /* 1. The previous placement as it is, if it still serves. */
    i64 X = prev_lay[0], R = prev_lay[1], n_cls = prev_lay[7];
    rc = quotas_of(tokens, W, E, e_loc, C, X, R, (const i64 *)(intptr_t)prev_lay[2],
                   (const i64 *)(intptr_t)prev_lay[3], (const i64 *)(intptr_t)prev_lay[4],
                   (const i64 *)(intptr_t)prev_lay[5], (const i64 *)(intptr_t)prev_lay[6], n_cls, rounds, out_quota);
    if (rc != 0) goto done;
    i64 top = rank_max(out_quota, W, C, rank_W);
    info[0] = 0;
    info[2] = top;
    if ((double)top <= mean / (keep < target ? keep : target)) goto done;
    /* 2. Free the slots of replicas an expert no longer needs (its first ones in slot order stay). */
    for (i64 e = 0; e < E; e++) {
        double v = ceil((double)tokens[e] / mean - 1e-9) - 1.0;
        i64 n = v < 0.0 ? 0 : (v > (double)(W - 1) ? W - 1 : (i64)v);
        n += n > 0;
        need[e] = n > W - 1 ? W - 1 : n;
    }
    int dropped = 0;
    for (i64 w = 0; w < W; w++)
        for (i64 c = e_loc; c < C; c++) {
            i64 e = out_phy[w * C + c];
            if (e >= 0 && seen[e]++ >= need[e]) { out_phy[w * C + c] = -1; dropped = 1; }
        }
    if (dropped) {
        rc = quotas_on(tokens, out_phy, W, E, e_loc, C, rounds, out_quota);
        if (rc != 0) goto done;
        top = rank_max(out_quota, W, C, rank_W);
        info[0] = 1;
        info[2] = top;
    }
    if ((double)top <= stop) goto done;
    /* 3. Greedy, one replica at a time: the expert with the largest share on the heaviest rank
     * is copied to the lightest rank with a free slot that holds no copy of it. */
    /* Kept per expert: its copies' slots in ascending order (cop [E, W]); per rank: free replica
     * slots (free_W). One pass over the slots here, none per replica added. */
    i64 nfree = 0;
    for (i64 w = 0, p = 0; w < W; w++) {
        free_W[w] = 0;
        for (i64 c = 0; c < C; c++, p++) {
            slot_rank[p] = (int32_t)w; /* NOTE: a table, not p / C: no division in the loop below */
            i64 e = out_phy[p];
            if (e >= 0) cop[e * W + ncop[e]++] = (int32_t)p;
            else if (c >= e_loc) { nfree++; free_W[w]++; }
        }
    }
    int added = 0;
    for (i64 it = 0; it < nfree; it++) {
        i64 rmax = 0;
        for (i64 w = 1; w < W; w++) if (rank_W[w] > rank_W[rmax]) rmax = w;
        const i64 *held = out_phy + rmax * C;
        i64 j = 0, best = -1;
        for (i64 c = 0; c < C; c++) {
            i64 v = (held[c] >= 0 && ncop[held[c]] < W) ? out_quota[rmax * C + c] : -1;
            if (c == 0 || v > best) { best = v; j = c; }
        }
        i64 e = held[j];
        int32_t *ce = cop + (e >= 0 ? e : 0) * W;
        i64 n = e >= 0 ? ncop[e] : 0;
        for (i64 r = 0; r < n; r++) holds[slot_rank[ce[r]]] = 1;
        i64 rmin = -1;
        for (i64 w = 0; w < W; w++)
            if (free_W[w] > 0 && !holds[w] && (rmin < 0 || rank_W[w] < rank_W[rmin])) rmin = w;
        for (i64 r = 0; r < n; r++) holds[slot_rank[ce[r]]] = 0;
        i64 t = rank_W[rmax];
        if ((double)t <= stop || best <= 0 || rmin < 0 || !(rank_W[rmin] < t)) break;
        i64 q = rmin * C + e_loc;
        while (out_phy[q] >= 0) q++;
        out_phy[q] = e;
        out_quota[q] = 0;
        free_W[rmin]--;
        added = 1;
        i64 at = n;  /* the new copy's place among the expert's slots, in ascending order */
        while (at > 0 && ce[at - 1] > q) { ce[at] = ce[at - 1]; at--; }
        ce[at] = (int32_t)q;
        n = ++ncop[e];
        for (i64 r = 0; r < n; r++) base[r] = rank_W[slot_rank[ce[r]]] - out_quota[ce[r]];
        water_int(base, n, tokens[e], sorted, fill);
        for (i64 r = 0; r < n; r++) { out_quota[ce[r]] = fill[r]; rank_W[slot_rank[ce[r]]] = base[r] + fill[r]; }
    }
    if (added) {
        rc = quotas_on(tokens, out_phy, W, E, e_loc, C, rounds, out_quota);
        if (rc != 0) goto done;
        info[0] = 2;
        info[2] = rank_max(out_quota, W, C, NULL);
    }
done:
    free(rank_W); free(need); free(seen); free(ncop); free(base); free(sorted); free(fill); free(cop); free(free_W);
    free(holds); free(slot_rank);
    return rc;
}

/* The step's gathered buffer [W, N] (N = head + 2E: header, counts, lookahead counts): sums of
 * the counts and of the lookahead counts over ranks; returns 1 if a rank reported a failure
 * (column 0), plus 2 if the fingerprint columns [fp_lo, fp_hi) differ between ranks. */
static int gather_impl(const i64 *restrict buf, i64 W, i64 N, i64 head, i64 fp_lo, i64 fp_hi, i64 E, i64 ahead,
                       i64 *restrict sum_E, i64 *restrict ahead_E) {
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
static void count_impl(const i64 *routes, i64 n, i64 E, i64 *out) {
    memset(out, 0, (size_t)E * sizeof(i64));
    for (i64 i = 0; i < n; i++) {
        i64 e = routes[i];
        if (e >= 0 && e < E) out[e]++;
    }
}

/* hooks.step_stats in one pass: rank_W [W] = quota summed per rank; out [4] = balancedness (mean /
 * max of rank_W, 1 when nothing was computed), dropped routes (sum of total - sum of quota), and,
 * with pred (may be NULL: NaN), prediction_quality's L1 and recall. */
static void prediction_quality(const double *pred, const i64 *act, i64 E, i64 W, double *out);
static void step_stats_impl(const i64 *quota, i64 W, i64 C, const i64 *total, i64 E, const double *pred, i64 *rank_W,
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
    if (pred) prediction_quality(pred, total, E, W, out + 2);
    else out[2] = out[3] = __builtin_nan("");
}

/* The L1 distance between predicted and actual load shares, and the recall of the hot experts
 * (actual share above 1 / W): hooks.prediction_quality is its twin. out [2]. */
static void prediction_quality(const double *pred, const i64 *act, i64 E, i64 W, double *out) {
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

/* Copies per expert of the slot table phy [P] (cnt [E] out); returns the most copies (at least 1),
 * or -1 if an entry lies outside [-1, E). */
static i64 copies_impl(const i64 *phy, i64 P, i64 E, i64 *cnt) {
    memset(cnt, 0, (size_t)E * sizeof(i64));
    for (i64 p = 0; p < P; p++) {
        if (phy[p] < -1 || phy[p] >= E) return -1;
        if (phy[p] >= 0) cnt[phy[p]]++;
    }
    i64 R = 1;
    for (i64 e = 0; e < E; e++) if (cnt[e] > R) R = cnt[e];
    return R;
}

/* Each expert's slots in ascending slot order, -1 padded: log2phy [E, R] out (placement.log2phy_of
 * for one layer; R at least the most copies). Returns 0, or -1 without scratch memory. */
static i64 log2phy_impl(const i64 *phy, i64 P, i64 E, i64 R, i64 *log2phy) {
    i64 *fill = calloc((size_t)E + 1, sizeof(i64));
    if (!fill) return -1;
    for (i64 i = 0; i < E * R; i++) log2phy[i] = -1;
    for (i64 p = 0; p < P; p++) {
        i64 e = phy[p];
        if (e >= 0 && fill[e] < R) log2phy[e * R + fill[e]++] = p;
    }
    free(fill);
    return 0;
}

/* replicas.ReplicaTable._valid compiled: ok [P] (bytes) = the slot of phy [P] is a home slot, is
 * empty, or holds its expert's copy made at the current weights versions of the expert's home rank
 * and of the holder (version [W]). */
static void valid_impl(const i64 *expert, const i64 *home_version, const i64 *holder_version, const i64 *phy,
                       const i64 *version, i64 W, i64 C, i64 e_loc, unsigned char *ok) {
    for (i64 w = 0, p = 0; w < W; w++)
        for (i64 c = 0; c < C; c++, p++) {
            i64 e = phy[p];
            ok[p] = c < e_loc || e < 0 ||
                    (expert[p] == e && home_version[p] == version[e / (e_loc > 0 ? e_loc : 1)] &&
                     holder_version[p] == version[w]);
        }
}

/* Entry points. Every argument travels in one int64 vector a (integers and addresses): ctypes
 * converts each argument of a call separately, about a tenth of a microsecond each, and these run
 * a few times per layer per step. */
#define AP(T, i) ((T *)(intptr_t)a[i])

int ds_split(const i64 *a) {
    return split_impl(AP(const i64, 0), a[1], a[2], a[3], a[4], a[5], a[6], a[7], AP(const i64, 8),
                      AP(const i64, 9), AP(const i64, 10), AP(const i64, 11), AP(const i64, 12), a[13], a[14], a[15],
                      AP(i64, 16), AP(i64, 17));
}

int ds_split_rank(const i64 *a) {
    return split_rank_impl(AP(const i64, 0), a[1], AP(const i64, 2), a[3], a[4], a[5], a[6], AP(const i64, 7), a[8],
                           a[9], a[10], AP(i64, 11));
}

i64 ds_layout(const i64 *a) {
    return layout_impl(AP(const i64, 0), a[1], a[2], a[3], AP(const i64, 4), a[5], a[6], AP(i64, 7), AP(i64, 8),
                       AP(i64, 9), AP(i64, 10), AP(i64, 11));
}

int ds_replan(const i64 *a, const double *d) {
    return replan_impl(AP(const double, 0), a[1], a[2], a[3], AP(const i64, 4), AP(const i64, 5), a[6], d[0], d[1],
                       AP(i64, 7), AP(i64, 8), AP(i64, 9), AP(i64, 10));
}

int ds_gather(const i64 *a) {
    return gather_impl(AP(const i64, 0), a[1], a[2], a[3], a[4], a[5], a[6], a[7], AP(i64, 8), AP(i64, 9));
}

void ds_count(const i64 *a) { count_impl(AP(const i64, 0), a[1], a[2], AP(i64, 3)); }

void ds_valid(const i64 *a) {
    valid_impl(AP(const i64, 0), AP(const i64, 1), AP(const i64, 2), AP(const i64, 3), AP(const i64, 4), a[5], a[6],
               a[7], AP(unsigned char, 8));
}

i64 ds_copies(const i64 *a) { return copies_impl(AP(const i64, 0), a[1], a[2], AP(i64, 3)); }

i64 ds_log2phy(const i64 *a) { return log2phy_impl(AP(const i64, 0), a[1], a[2], a[3], AP(i64, 4)); }

void ds_step_stats(const i64 *a) {
    step_stats_impl(AP(const i64, 0), a[1], a[2], AP(const i64, 3), a[4], AP(const double, 5), AP(i64, 6),
                    AP(double, 7));
}
"""


def _cache_dir() -> Path:
    return Path(os.environ.get("DS_MOE_REPLICATE_CACHE", Path.home() / ".cache" / "ds_moe_replicate"))


# NOTE: no -march=native: the cache directory may be shared by machines of different CPUs.
_FLAGS = ("-O3", "-shared", "-fPIC")
_LIBS = ("-lm",)
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
# Every entry point takes its arguments packed in one int64 vector (``_call``); the re-plan also a
# double vector.
_SIGNATURES = {name: [_PTR] for name in ("ds_split", "ds_split_rank", "ds_gather", "ds_count", "ds_step_stats",
                                         "ds_layout", "ds_copies", "ds_log2phy", "ds_valid")}
_SIGNATURES["ds_replan"] = [_PTR, _PTR]
_RESTYPES = {"ds_count": None, "ds_step_stats": None, "ds_layout": ctypes.c_int64, "ds_copies": ctypes.c_int64,
             "ds_log2phy": ctypes.c_int64, "ds_valid": None}


@functools.lru_cache(maxsize=1)
def _library():
    """The loaded library, built on first use; None where it cannot be built or loaded."""
    digest = hashlib.sha1((_SOURCE + " ".join(_FLAGS + _LIBS)).encode()).hexdigest()[:16]
    lib_path = _cache_dir() / f"control_{digest}.so"
    try:
        if not lib_path.exists():
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            # NOTE: built in a private directory and renamed into place, so ranks that build at
            # the same moment never load a half-written library.
            with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
                src, out = Path(tmp) / "control.c", Path(tmp) / "control.so"
                src.write_text(_SOURCE)
                subprocess.run([os.environ.get("CC", "cc"), *_FLAGS, "-o", str(out), str(src), *_LIBS],
                               check=True, capture_output=True, timeout=120)
                os.replace(out, lib_path)
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, subprocess.SubprocessError):
        return None
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = _RESTYPES.get(name, ctypes.c_int)
    return lib


_FROM_BUFFER, _ADDRESS_OF = ctypes.c_char.from_buffer, ctypes.addressof


def address(arr: np.ndarray) -> int:
    """The address of ``arr``'s first element. For a writable C-contiguous array through the
    buffer protocol (a third of the cost of ``arr.ctypes.data``, which builds a helper object;
    this runs a few times per layer per step); ``arr.ctypes.data`` for any other."""
    flags = arr.flags
    if flags.c_contiguous and flags.writeable and arr.size:
        return _ADDRESS_OF(_FROM_BUFFER(arr))
    return arr.ctypes.data


def available() -> bool:
    """True if the compiled control path can be used on this machine."""
    return _library() is not None


def _call(fn, *values: int):
    """Call the entry point ``fn`` with its arguments (integers and addresses) packed in one int64
    vector, which lives until the call returns."""
    args = array.array("q", values)
    return fn(args.buffer_info()[0])


def split_into(counts_WE: np.ndarray, lay, W: int, C: int, e_loc: int, rounds: int, prefer_local: bool,
               send_WP, quota_P: np.ndarray) -> bool:
    """Fill ``send_WP`` (int64 [rows of counts_WE, P], or None for the quotas alone) and
    ``quota_P`` (int64 [P]), every entry, for the layout ``lay`` (``split._Layout``); False if
    the compiled split is not available or had no scratch memory. ``counts_WE`` has W rows for
    the split; any number of rows (their sum is what counts) for the quotas alone, with
    ``prefer_local`` off."""
    lib = _library()
    if lib is None:
        return False
    counts = np.ascontiguousarray(counts_WE, dtype=np.int64)
    if counts.ndim != 2 or (send_WP is not None and send_WP.shape != (counts.shape[0], W * C)) \
            or quota_P.shape != (W * C,):
        raise ValueError(f"counts {counts.shape}, send {None if send_WP is None else send_WP.shape} and quota "
                         f"{quota_P.shape} do not fit W={W}, C={C}")
    # NOTE: False also when the library had no scratch memory (-1): the caller's twin gives the
    # same integers, so this rank still agrees with the others (raising here alone would leave
    # them waiting in the next collective).
    return _call(lib.ds_split, address(counts), counts.shape[0], W, counts.shape[1], e_loc, C, *lay.native_args,
                 rounds, int(prefer_local), 0 if send_WP is None else address(send_WP), address(quota_P)) == 0


def split_rank_into(counts_WE: np.ndarray, total_E: np.ndarray, lay, rank: int, C: int, e_loc: int, rounds: int,
                    prefer_local: bool, out: np.ndarray, counts_ptr: int = 0) -> bool:
    """The split as rank ``rank`` needs it (``split.transport_rank``): fill ``out`` (int64 [2P + W*C]:
    send_P [P], recv_WC [W, C], quota_P [P]), every entry. ``counts_WE``: int64 [W, E] with
    contiguous rows (a view into the gathered buffer is fine); ``total_E``: int64 contiguous, its
    column sums; ``counts_ptr``: its address if the caller has it. False if the library is not
    available or had no scratch memory."""
    lib = _library()
    if lib is None:
        return False
    W, E = counts_WE.shape
    return _call(lib.ds_split_rank, counts_ptr or address(counts_WE), counts_WE.strides[0] // 8, address(total_E),
                 W, E, e_loc, C, lay.native_block_ptr, rounds, int(prefer_local), rank, address(out)) == 0


def gather_sums(buf_WN: np.ndarray, head: int, fp_lo: int, fp_hi: int, E: int, ahead: bool = True, ptr: int = 0):
    """(flags, counts summed over ranks [E], lookahead counts summed [E]) of the step's gathered
    int64 C-contiguous [W, head + 2E] buffer; flags: 1 = a rank reported a failure (column 0),
    2 = the fingerprint columns [fp_lo, fp_hi) differ. Without ``ahead`` the lookahead section is
    not read (zeros). ``ptr``: the buffer's address if the caller has it. None if the library is
    not available."""
    lib = _library()
    if lib is None:
        return None
    sums = np.empty(2 * E, dtype=np.int64)
    W, N = buf_WN.shape
    at = address(sums)
    flags = _call(lib.ds_gather, ptr or address(buf_WN), W, N, head, fp_lo, fp_hi, E, int(ahead), at, at + 8 * E)
    return flags, sums[:E], sums[E:]


def count_into(routes_ptr: int, n: int, num_experts: int, out_ptr: int) -> bool:
    """Count the n int64 routes at address ``routes_ptr`` (values in [0, E); -1 = not taken) into
    the int64 [E] at ``out_ptr`` (``gating.count_routes`` on the host); False without the library."""
    lib = _library()
    if lib is None:
        return False
    _call(lib.ds_count, routes_ptr, n, num_experts, out_ptr)
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
    _call(lib.ds_step_stats, address(quota_P), W, quota_P.size // W, address(total_E), total_E.size,
          0 if pred_E is None else address(pred_E), address(rank_W), address(out))
    return rank_W, float(out[0]), int(out[1]), float(out[2]), float(out[3])


def layout_of(phy_P: np.ndarray, W: int, C: int, cnt_E: np.ndarray, X: int, R: int):
    """The compiled half of ``split._Layout`` for the slot table ``phy_P`` (int64 [W * C]) with
    ``cnt_E`` copies per expert (int64 [E]), X of them replicated, R copies at most: (rep_X [X],
    slot_XR [X, R], rank_XR [X, R], cls_rows [X], cls_start [classes + 1]), the same integers as
    ``split._layout_numpy``. None if the library is not available or had no scratch memory."""
    lib = _library()
    if lib is None:
        return None
    phy = np.ascontiguousarray(phy_P, dtype=np.int64)
    cnt = np.ascontiguousarray(cnt_E, dtype=np.int64)
    rep_X, cls_rows = np.empty(X, dtype=np.int64), np.empty(X, dtype=np.int64)
    slot_XR, rank_XR = np.empty((X, R), dtype=np.int64), np.empty((X, R), dtype=np.int64)
    cls_start = np.empty(X + 1, dtype=np.int64)
    n_cls = _call(lib.ds_layout, address(phy), W, C, cnt.size, address(cnt), X, R, address(rep_X), address(slot_XR),
                  address(rank_XR), address(cls_rows), address(cls_start))
    if n_cls < 0:
        return None  # NOTE: no scratch memory here: the twin gives the same layout
    return rep_X, slot_XR, rank_XR, cls_rows, cls_start[:n_cls + 1]


def replan_into(load_E: np.ndarray, W: int, e_loc: int, S: int, prev_phy_ptr: int, prev_block_ptr: int,
                rounds: int, keep: float, target: float):
    """The re-plan of ``replan.replan`` compiled: (tokens [E], new slot table [P], its quotas [P],
    info [4]: status, home max, plan max, tokens' sum), the same integers as
    ``replan._replan_numpy``. ``load_E``
    float64 C-contiguous [E]; ``prev_phy_ptr`` and ``prev_block_ptr``: the previous placement's
    slot table and layout (``Placement.phy_ptr`` and ``split._Layout.native_block_ptr``). None if the
    library is not available or had no scratch memory; ValueError for a negative, non-finite or too
    large load."""
    lib = _library()
    if lib is None:
        return None
    P = W * (e_loc + S)
    buf = np.empty(W * e_loc + 2 * P + 4, dtype=np.int64)
    at = address(buf)
    args = array.array("q", (address(load_E), W, e_loc, S, prev_phy_ptr, prev_block_ptr, rounds, at,
                             at + 8 * W * e_loc, at + 8 * (W * e_loc + P), at + 8 * (W * e_loc + 2 * P)))
    thresholds = array.array("d", (keep, target))
    rc = lib.ds_replan(args.buffer_info()[0], thresholds.buffer_info()[0])
    if rc == -2:
        raise ValueError("load must be finite, non-negative and at most 2**53")
    if rc != 0:
        return None  # NOTE: no scratch memory here: the twin gives the same plan on this rank
    E = W * e_loc
    return buf[:E], buf[E:E + P], buf[E + P:E + 2 * P], buf[E + 2 * P:]


def log2phy_of(phy_P: np.ndarray, num_experts: int):
    """(log2phy int64 [E, R], logcnt int64 [E]) of one layer's writable C-contiguous int64 slot
    table ``phy_P``: ``placement.log2phy_of`` for one layer, compiled (every new plan builds one).
    None if the library is not available or had no scratch memory; ValueError for an entry
    outside [-1, E)."""
    lib = _library()
    if lib is None:
        return None
    at = address(phy_P)
    cnt = np.empty(num_experts, dtype=np.int64)
    R = _call(lib.ds_copies, at, phy_P.size, num_experts, address(cnt))
    if R < 0:
        raise ValueError(f"phy2log holds expert ids outside [-1, E={num_experts})")
    out = np.empty((num_experts, R), dtype=np.int64)
    if _call(lib.ds_log2phy, at, phy_P.size, num_experts, R, address(out)) != 0:
        return None  # NOTE: no scratch memory here: the caller's twin gives the same answer
    return out, cnt


def valid_slots(expert_P: np.ndarray, home_version_P: np.ndarray, holder_version_P: np.ndarray, placement,
                version_W: np.ndarray):
    """``replicas.ReplicaTable._valid`` compiled: bool [P]. The table's arrays are int64
    C-contiguous [P]; ``version_W`` int64 [W] (any layout). None if the library is not available."""
    lib = _library()
    if lib is None:
        return None
    version = np.ascontiguousarray(version_W, dtype=np.int64)
    phy = placement.phy2log_P
    ok = np.empty(phy.size, dtype=bool)
    _call(lib.ds_valid, address(expert_P), address(home_version_P), address(holder_version_P), placement.phy_ptr,
          address(version), placement.ep_size, placement.slots_per_rank_total, placement.experts_per_rank,
          address(ok))
    return ok
