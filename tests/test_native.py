"""The compiled control path (``native``) against its NumPy / torch twins: the step's gathered
buffer (sums over ranks, failure and fingerprint flags), the route count and the step
statistics; and ``comm.gather_step`` gives the same answers with and without the library."""

from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_moe_replicate import comm, native
from ds_moe_replicate.gating import count_routes
from ds_moe_replicate.hooks import prediction_quality


@pytest.fixture
def no_library(monkeypatch):
    monkeypatch.setattr(native, "_library", lambda: None)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 40), st.integers(0, 2**31 - 1), st.booleans(), st.booleans())
def test_gather_sums_match_numpy(W, E, seed, failed, differ):
    rng = np.random.default_rng(seed)
    head, lo, hi = 6, 2, 6
    buf = rng.integers(0, 1000, (W, head + 2 * E)).astype(np.int64)
    buf[:, 0] = 0
    buf[:, lo:hi] = buf[0, lo:hi]
    if failed:
        buf[rng.integers(W), 0] = 3
    if differ and W > 1:
        buf[1 + rng.integers(W - 1), lo + rng.integers(hi - lo)] += 1
    flags, sum_E, ahead_E = native.gather_sums(buf, head, lo, hi, E)
    assert flags == int(failed) | 2 * int(differ and W > 1)
    np.testing.assert_array_equal(sum_E, buf[:, head:head + E].sum(axis=0))
    np.testing.assert_array_equal(ahead_E, buf[:, head + E:].sum(axis=0))
    _, _, skipped = native.gather_sums(buf, head, lo, hi, E, ahead=False)
    assert not skipped.any()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.integers(1, 3), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_count_routes_matches_bincount(T, K, E, seed):
    rng = np.random.default_rng(seed)
    expert_TK = torch.from_numpy(rng.integers(-1, E, (T, K)))
    want = torch.bincount(expert_TK[expert_TK >= 0], minlength=E).numpy()
    got = count_routes(expert_TK, E)
    assert isinstance(got, np.ndarray) and got.dtype == np.int64 and got.shape == (E,)  # host: NumPy
    np.testing.assert_array_equal(got, want)
    # The device path (used on GPUs) on the host gives the same counts.
    with mock.patch.object(native, "_library", lambda: None):
        np.testing.assert_array_equal(count_routes(expert_TK, E), want)
    # A strided view takes the torch path: the same counts, as NumPy on the host.
    strided = torch.from_numpy(rng.integers(-1, E, (K, T))).T
    np.testing.assert_array_equal(count_routes(strided, E), torch.bincount(strided[strided >= 0], minlength=E).numpy())


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 64), st.integers(1, 16), st.integers(1, 4), st.integers(0, 2**31 - 1), st.booleans(),
       st.booleans())
def test_step_stats_match_their_twin(E, W, C, seed, zero_actual, with_prediction):
    rng = np.random.default_rng(seed)
    pred = rng.random(E) * (rng.random(E) < 0.8) if with_prediction else None
    act = np.zeros(E, dtype=np.int64) if zero_actual else rng.integers(0, 500, E) * (rng.random(E) < 0.5)
    act[rng.integers(E)] += 0 if zero_actual else 3000
    quota = rng.integers(0, 400, W * C) * (rng.random(W * C) < 0.7)
    rank_W, bal, dropped, l1, recall = native.step_stats(quota, W, act, pred)
    want_W = quota.reshape(W, C).sum(axis=1)
    np.testing.assert_array_equal(rank_W, want_W)
    assert bal == pytest.approx(want_W.mean() / want_W.max() if want_W.max() > 0 else 1.0, rel=1e-12)
    assert dropped == int(act.sum() - quota.sum())
    l1_np, recall_np = prediction_quality(pred, act, W)
    if pred is None:
        assert np.isnan(l1) and np.isnan(recall) and np.isnan(l1_np) and np.isnan(recall_np)
    else:
        assert l1 == pytest.approx(l1_np, rel=1e-12, abs=1e-12)
        assert recall == recall_np


def _gather(W, E, rows_WN, counts_E, ahead_E=None, buffer=None):
    """``gather_step`` as rank 0 of W, the collective replaced by the prepared rows."""

    def fake(out, payload, group=None):
        want = rows_WN.copy()
        want[0] = payload.numpy()  # this rank's own row is what it sent
        out.copy_(torch.from_numpy(want).reshape(-1))

    with mock.patch.object(comm, "dist", SimpleNamespace(all_gather_into_tensor=fake)), \
            mock.patch.object(comm, "group_size", lambda group: W), mock.patch.object(comm, "group_rank",
                                                                                     lambda group: 0):
        return comm.gather_step(counts_E, comm.Fingerprint(comm.SITE_LAYER, 7), object(), tokens=5, ahead_E=ahead_E,
                                buffer=buffer)


@pytest.mark.parametrize("compiled", [True, False])
def test_gather_step_sums_flags_and_payload(compiled, monkeypatch):
    if not compiled:
        monkeypatch.setattr(native, "_library", lambda: None)
    W, E = 3, 5
    rng = np.random.default_rng(0)
    rows = np.zeros((W, comm.HEADER + 2 * E), dtype=np.int64)
    rows[:, comm._HEAD:comm.HEADER] = comm.Fingerprint(comm.SITE_LAYER, 7).values()
    rows[:, comm.HEADER:] = rng.integers(0, 9, (W, 2 * E))
    counts = torch.tensor([1, 0, 4, 2, 3])
    ahead = torch.tensor([0, 5, 0, 0, 1])
    g = _gather(W, E, rows, counts, ahead)
    want = rows.copy()
    want[0, comm.HEADER:comm.HEADER + E] = counts.numpy()
    want[0, comm.HEADER + E:] = ahead.numpy()
    np.testing.assert_array_equal(g.counts_WE, want[:, comm.HEADER:comm.HEADER + E])
    np.testing.assert_array_equal(g.total_E, want[:, comm.HEADER:comm.HEADER + E].sum(axis=0))
    np.testing.assert_array_equal(g.ahead_total_E, want[:, comm.HEADER + E:].sum(axis=0))
    assert g.tokens_W[0] == 5
    # A layer's buffer is reused by its next step; the sums are the step's own; host counts may be
    # NumPy (what count_routes returns there).
    buffer = comm.GatherBuffer()
    first = _gather(W, E, rows, counts, ahead, buffer=buffer)
    kept = first.total_E.copy()
    rows2 = rows.copy()
    rows2[:, comm.HEADER:] *= 2
    second = _gather(W, E, rows2, counts.numpy() * 3, buffer=buffer)
    assert np.shares_memory(first.counts_WE, second.counts_WE) and second.counts_ptr == first.counts_ptr
    np.testing.assert_array_equal(first.total_E, kept)
    want2 = rows2.copy()
    want2[0, comm.HEADER:comm.HEADER + E] = counts.numpy() * 3
    want2[0, comm.HEADER + E:] = 0
    np.testing.assert_array_equal(second.total_E, want2[:, comm.HEADER:comm.HEADER + E].sum(axis=0))
    np.testing.assert_array_equal(second.ahead_total_E, 0)  # no lookahead section: not read
    assert second.counts_ptr == second.counts_WE.ctypes.data
    # Another rank failed: raised here too; another rank disagrees: told which field.
    bad = rows.copy()
    bad[2, 0] = 2
    with pytest.raises(comm.ReplicationError, match="rank 2: expert computation"):
        _gather(W, E, bad, counts)
    bad = rows.copy()
    bad[1, comm._HEAD + 1] = 8
    with pytest.raises(comm.ReplicationError, match="config"):
        _gather(W, E, bad, counts)


def test_step_stats_record_is_the_same_without_the_library(monkeypatch):
    from ds_moe_replicate.hooks import step_stats
    from ds_moe_replicate.placement import Placement
    from ds_moe_replicate.split import transport_rank

    rng = np.random.default_rng(4)
    counts = rng.integers(0, 60, (4, 8)).astype(np.int64)
    counts[:, 5] += 500
    pl = Placement.from_phy2log([0, 1, 5, 2, 3, 5, 4, 5, -1, 6, 7, 5], 4, 2, 1)
    split = transport_rank(counts, pl, 1)
    pred = counts.sum(axis=0) * rng.uniform(0.5, 1.5, 8)
    fast = step_stats(3, pl, counts.sum(axis=0), split, pred)
    monkeypatch.setattr(native, "_library", lambda: None)
    twin = step_stats(3, pl, counts.sum(axis=0), split, pred)
    assert torch.equal(fast.rank_tokens_W, twin.rank_tokens_W) and fast.dropped_tokens == twin.dropped_tokens == 0
    assert fast.num_replicas == twin.num_replicas == 3
    for name in ("balancedness", "prediction_l1", "hot_recall"):
        assert getattr(fast, name) == pytest.approx(getattr(twin, name), rel=1e-12)


def test_a_compiled_call_without_scratch_memory_falls_back_to_the_twin(monkeypatch):
    """A compiled call that could not allocate answers "not available" (the twin runs and gives the
    same integers) instead of raising on one rank while the others go on into the next collective."""
    from ds_moe_replicate import replan as replan_mod
    from ds_moe_replicate import split
    from ds_moe_replicate.placement import Placement
    from ds_moe_replicate.planner import plan_replicas

    if not native.available():
        pytest.skip("no C compiler")
    rng = np.random.default_rng(4)
    W, E = 8, 32
    counts = rng.integers(0, 60, (W, E))
    counts[:, 3] += 500
    placement = plan_replicas(counts.sum(axis=0), W, 2).placement()
    load = (counts.sum(axis=0) * rng.uniform(0.5, 1.5, E)).astype(float)
    want = (split.transport_rank(counts, placement, 2), split.quotas(counts, placement),
            replan_mod.replan(load, placement, with_quotas=True), Placement.from_phy2log(placement.phy2log_P, W, 4, 2))
    call = native._call

    def no_memory(fn, *values):  # every entry point that allocates reports -1
        rc = call(fn, *values)
        return -1 if fn.__name__ in ("ds_split", "ds_split_rank", "ds_replan", "ds_layout", "ds_log2phy") else rc

    monkeypatch.setattr(native, "_call", no_memory)
    monkeypatch.setattr(native._library(), "ds_replan", lambda args, thresholds: -1)
    split._cache.clear()
    split._by_object.clear()
    got = (split.transport_rank(counts, placement, 2), split.quotas(counts, placement),
           replan_mod.replan(load, placement, with_quotas=True), Placement.from_phy2log(placement.phy2log_P, W, 4, 2))
    for a, b in ((want[0].send_P, got[0].send_P), (want[0].recv_WC, got[0].recv_WC), (want[1], got[1]),
                 (want[2].placement.phy2log_P, got[2].placement.phy2log_P), (want[2].quota_P, got[2].quota_P),
                 (want[3].log2phy_ER, got[3].log2phy_ER)):
        np.testing.assert_array_equal(a, b)
    assert want[2].status == got[2].status
