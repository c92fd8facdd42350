"""Benchmarks: workloads, traces, cost model, emulation, calibration, and the benchmark itself on
2 gloo ranks at tiny sizes (a smoke test of every mode, the JSON, the trace and the plots)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bench_workers
from ds_moe_replicate.bench import bench, costmodel, emulate
from ds_moe_replicate.bench.driven import DrivenLayer
from ds_moe_replicate.bench.traces import Trace, TraceRecorder, counts_from_router_logits, load_trace, save_trace
from ds_moe_replicate.bench.workloads import Workload, assign, zipf_shares
from ds_moe_replicate.predictor import EmaPredictor, OraclePredictor
from ds_moe_replicate.testing import run_ranks

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- workloads

def test_zipf_shares_follow_the_exponent():
    s = zipf_shares(8, 1.2)
    assert s.sum() == pytest.approx(1.0) and np.all(np.diff(s) < 0)
    assert s[0] / s[1] == pytest.approx(2 ** 1.2)
    assert costmodel.fit_zipf_exponent(s * 1e6) == pytest.approx(1.2, abs=1e-6)
    with pytest.raises(ValueError, match="exponent"):
        zipf_shares(8, -1)


def test_drift_and_switch_move_the_hot_expert():
    zipf, drift, switch = (Workload(k, 3, 8, seed=1) for k in ("zipf", "drift", "switch"))

    def hot(wl, b):
        return wl.shares(b).argmax(axis=1)

    assert np.array_equal(hot(zipf, 0), hot(zipf, 9))
    assert np.array_equal(hot(drift, 0), hot(drift, 3)) and np.array_equal((hot(drift, 0) + 1) % 8, hot(drift, 4))
    assert np.array_equal((hot(switch, 0) + 4) % 8, hot(switch, 1)) and np.array_equal(hot(switch, 0), hot(switch, 2))


def test_assign_realises_shares_and_correlation():
    shares = Workload("zipf", 2, 8, exponent=1.0, seed=0).shares(0)
    ex = assign(shares, 40000, 0.0, seed=0)
    got = np.bincount(ex[:, 1], minlength=8) / 40000
    assert np.abs(got - shares[1]).max() < 0.01
    # rho = 1: the second layer's choice is a function of the first's (same popularity rank).
    ex1 = assign(shares, 2000, 1.0, seed=0)
    pairs = {(a, b) for a, b in ex1}
    assert len(pairs) == len({a for a, _ in ex1})
    assert len({(a, b) for a, b in ex}) > 8


def test_workload_refuses_bad_arguments():
    with pytest.raises(ValueError, match="--workload"):
        Workload("bursty", 2, 8)
    with pytest.raises(ValueError, match="--correlation"):
        Workload("zipf", 2, 8, correlation=1.5)
    with pytest.raises(ValueError, match="--trace"):
        Workload("trace", 2, 8, trace_counts_BLE=np.ones((3, 2, 4)))


# ---------------------------------------------------------------------------- traces

@pytest.mark.parametrize("ext", ["json", "pt"])
def test_trace_round_trip(tmp_path, ext):
    counts = np.random.default_rng(0).integers(0, 50, size=(3, 2, 8))
    path = str(tmp_path / f"t.{ext}")
    save_trace(Trace(counts, 2, "unit"), path)
    back = load_trace(path)
    assert np.array_equal(back.counts_BLE, counts) and back.k == 2 and back.source == "unit"


def test_trace_refuses_bad_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"format": "other", "counts": [[[1]]]}))
    with pytest.raises(ValueError, match="format tag"):
        load_trace(str(bad))
    with pytest.raises(ValueError, match=".json or .pt"):
        save_trace(Trace(np.ones((1, 1, 2), dtype=np.int64)), str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError, match="--trace"):
        load_trace(str(tmp_path / "missing.json"))


class _ToyHFMoE(nn.Module):
    """A transformers-style model: each block's router is a Linear named ``router`` (E outputs)."""

    def __init__(self, hidden=16, experts=4, blocks=3):
        super().__init__()
        self.config = type("C", (), {"num_experts": experts})()
        self.blocks = nn.ModuleList(nn.ModuleDict({"router": nn.Linear(hidden, experts, bias=False),
                                                   "proj": nn.Linear(hidden, hidden)}) for _ in range(blocks))

    def forward(self, x):
        for b in self.blocks:
            b["router"](x)
            x = x + b["proj"](x)
        return x


def test_recorder_hooks_transformers_routers_and_closes_batches():
    torch.manual_seed(0)
    model = _ToyHFMoE()
    rec = TraceRecorder(k=1)
    assert rec.attach(model) == 3  # the routers only, not the same-shaped projections
    xs = [torch.randn(20, 16) for _ in range(4)]
    for x in xs:
        model(x)
    t = rec.trace()
    assert t.counts_BLE.shape == (4, 3, 4) and (t.counts_BLE.sum(axis=2) == 20).all()
    # The first layer's counts are its router's top-1 on the input itself.
    expected = counts_from_router_logits(model.blocks[0]["router"](xs[2]), 1)
    assert np.array_equal(t.counts_BLE[2, 0], expected)
    rec2 = TraceRecorder(k=2)
    rec2.add_router_logits([torch.randn(10, 4), torch.randn(10, 4)])
    assert rec2.trace().counts_BLE.sum() == 2 * 10 * 2
    with pytest.raises(ValueError, match="no ReplicatedMoE"):
        TraceRecorder().attach(nn.Linear(3, 3))


def test_recorded_counts_match_across_stock_and_replicated_on_two_ranks():
    r0, r1 = run_ranks(bench_workers.record_traces, 2, 3, 2, 4)
    stock_sum = r0.stock_BLE + r1.stock_BLE  # stock records this rank's counts
    assert stock_sum.shape == (3, 2, 4)
    assert np.array_equal(r0.replicated_BLE, stock_sum) and np.array_equal(r1.replicated_BLE, stock_sum)
    # The steered tokens route as the workload asked (so benchmarks control skew through the real gate).
    assert np.array_equal(stock_sum, r0.steered_BLE + r1.steered_BLE)


# ---------------------------------------------------------------------------- cost model

def test_costmodel_stock_pays_for_skew_and_replication_recovers():
    hw, m = costmodel.HARDWARE["H100"], costmodel.MODELS["switch-base-128"]
    even = np.full((8, 128), 4096 / 128)
    skew = even.copy()
    skew[:, 0] = 4096 * 0.3
    assert costmodel.layer_ms("stock", skew, m, hw) > 3 * costmodel.layer_ms("stock", even, m, hw)
    sim = costmodel.simulate(np.stack([[skew.sum(axis=0)]] * 6), m, hw, slots_per_rank=2)
    assert set(sim) == {"stock", "stock_capacity", "no_replication", "static_history", "predictive:ema", "oracle"}
    assert sim["predictive:ema"][3:].mean() < sim["no_replication"][3:].mean() < sim["stock"][3:].mean()
    with pytest.raises(ValueError, match="mode"):
        costmodel.layer_ms("fast", even, m, hw)


def test_costmodel_projection_states_its_assumption_for_another_expert_count():
    counts = np.random.default_rng(0).multinomial(8192, zipf_shares(8, 1.2), size=(4, 2))
    p = costmodel.project(counts, costmodel.MODELS["switch-base-256"], costmodel.HARDWARE["H200"], 2)
    assert "fitted exponent 1.2" in p["assumption"] and p["speedup_vs_stock"]["predictive:ema"] > 1.5


def test_costmodel_cli_prints_projections(tmp_path, capsys):
    path = str(tmp_path / "t.json")
    save_trace(Trace(np.random.default_rng(1).multinomial(4096, zipf_shares(128, 1.0), size=(3, 2))), path)
    assert costmodel.main(["--trace", path, "--hardware", "H100", "--models", "switch-base-128"]) == 0
    out = capsys.readouterr().out
    assert "trace replayed as recorded" in out and "| switch-base-128 | H100 | 8 |" in out


def test_driven_policy_serves_history_plans_a_step_later_and_the_oracle_waits():
    """The benchmarks drive the layer's own policy: a history plan made at a step's close serves
    from the next step (its copies land meanwhile); the oracle plans this step and waits."""
    counts = np.array([100, 0, 0, 0, 10, 10, 10, 10], dtype=float)  # E = 8 on W = 4
    ema = DrivenLayer(costmodel.replication_config(1, EmaPredictor, replan_interval=1), 8, 4, bytes_per_replica=10)
    first = ema.step_forward(counts)
    assert first.placement.num_replicas == 0 and first.bytes_moved > 0 and not first.waited_W.any()
    second = ema.step_forward(counts)
    assert second.decision.activated and second.placement.num_replicas > 0 and not second.waited_W.any()
    assert ema.store.valid(second.placement).all()
    oracle = DrivenLayer(costmodel.replication_config(1, OraclePredictor), 8, 4)
    step = oracle.step_forward(counts)
    assert step.placement.num_replicas > 0 and step.waited_W.sum() == step.placement.num_replicas
    assert not oracle.step_forward(counts).waited_W.any()  # same plan: nothing moves again


# ---------------------------------------------------------------------------- emulation

def test_emulation_times_ranks_and_rewards_balance():
    timer = emulate.ExpertTimer(64, 256, repeats=3)
    link = costmodel.Hardware("link", 1, 1, 1e10, 1e10, 64, 1e-5, 0, 4)
    counts = emulate.zipf_counts(3, 1, 16, 512 * 8, 1.4, seed=0)
    r = emulate.emulate(counts, 8, 2, timer, link)
    assert r["stock"]["balancedness"] < r["oracle"]["balancedness"] and r["oracle"]["balancedness"] > 0.9
    assert r["oracle"]["speedup_vs_stock"] > 1.0 and len(timer.memo) > 2
    with pytest.raises(ValueError, match="--ranks"):
        emulate.emulate(counts, 5, 1, timer, link)


# ---------------------------------------------------------------------------- benchmark CLI

def test_modes_are_checked_by_name():
    assert bench.parse_modes("stock,predictive:<config>,oracle", "window") == ["stock", "predictive:window", "oracle"]
    with pytest.raises(ValueError, match="predictive:learned"):
        bench.parse_modes("predictive:learned", "ema")
    with pytest.raises(SystemExit):
        bench.main(["--out", "/tmp/x", "--warmup", "0"])


def test_benchmark_on_two_ranks_writes_json_trace_and_plots(tmp_path):
    out = str(tmp_path / "b")
    argv = ["--deepspeed_config", str(ROOT / "configs" / "demo.json"), "--out", out, "--layers", "2",
            "--hidden", "32", "--ffn", "64", "--tokens", "128", "--warmup", "2", "--steps", "2", "--zipf", "1.5"]
    assert run_ranks(bench_workers.bench_main, 2, argv) == [0, 0]
    body = json.loads(Path(out, "bench.json").read_text())
    modes = body["modes"]
    assert list(modes) == ["stock", "stock_capacity", "no_replication", "static_history", "predictive:ema",
                           "predictive:lookahead", "oracle"]
    for name, m in modes.items():
        assert m["ms_median"] > 0 and len(m["balancedness_per_layer"]) == 2
        if name != "stock_capacity":
            assert m["max_abs_diff_vs_stock"] <= 1e-5 and m["dropped_tokens"] == 0
    assert modes["stock_capacity"]["dropped_tokens"] > 0
    assert modes["oracle"]["balancedness"] > modes["stock"]["balancedness"]
    assert modes["static_history"]["balancedness"] > modes["no_replication"]["balancedness"]
    assert set(body["costmodel"]["check"]) >= {"stock", "predictive:ema", "oracle"}
    assert load_trace(os.path.join(out, "trace.json")).counts_BLE.shape == (4, 2, 8)
    for png in ("balancedness.png", "time.png"):
        assert Path(out, png).read_bytes()[:4] == b"\x89PNG"


def test_predictor_benchmark_has_the_ragged_baseline_and_its_balance_limit(tmp_path):
    out = tmp_path / "predictors.json"
    argv = ["--predictors", "ema,oracle", "--workloads", "switching", "--hidden", "32", "--ffn", "64", "--batch", "2",
            "--seq", "64", "--warmup", "2", "--steps", "2", "--json", str(out)]
    assert run_ranks(bench_workers.predictors_main, 2, argv) == [0, 0]
    rows = {r["mode"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"stock", "ragged", "ema", "oracle"}
    ragged, oracle = rows["ragged"], rows["oracle"]
    # The ragged path computes every token without copies: stock's output, no replica moved.
    assert ragged["max_abs_diff"] < 1e-5 and ragged["bytes_moved"] == 0
    assert ragged["vs_ragged"] == 1.0
    # The limit is 1 / the ragged path's balancedness; every mode's fraction is its speed-up over it.
    assert ragged["balance_limit"] == pytest.approx(1.0 / ragged["balancedness"])
    for row in rows.values():
        assert row["fraction_of_limit"] == pytest.approx(row["vs_ragged"] / ragged["balance_limit"])
    # The oracle planned for the step's own counts: at least as balanced as no replicas.
    assert oracle["balancedness"] >= ragged["balancedness"] - 1e-9
    assert oracle["max_abs_diff"] < 1e-5


def test_calibration_script_smoke(tmp_path):
    out = tmp_path / "calib.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "launch/calibrate_costmodel.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hw = costmodel.Hardware(**json.loads(out.read_text()))
    assert hw.flops > 1e8 and hw.mem_bw > 1e8 and hw.intra_bw == costmodel.HARDWARE["H100"].intra_bw


def test_real_predictor_replay_on_a_trace():
    """Replaying predictors on a trace: the oracle plans each batch's own counts, no replication is
    DeepSpeed's placement, a history predictor follows a hot expert that stays put."""
    from ds_moe_replicate.bench.real_predictors import replay
    from ds_moe_replicate.planner import balancedness, home_plan

    rng = np.random.default_rng(0)
    counts = rng.multinomial(4096, zipf_shares(16, 1.2), size=(12, 2)).astype(np.int64)  # hot experts fixed
    none = replay(counts, 4, 1, "none")
    home = np.mean([float(balancedness(home_plan(c, 4, 1).rank_load)[j]) for c in counts for j in range(2)])
    assert none["balancedness"] == pytest.approx(home) and np.isnan(none["l1"])
    oracle = replay(counts, 4, 1, "oracle")
    ema = replay(counts, 4, 1, "ema", replan_interval=1)
    assert oracle["l1"] == 0.0 and oracle["hot_recall"] == 1.0
    assert oracle["balancedness"] > ema["balancedness"] > none["balancedness"]
    # A prediction that is the truth itself plans as the oracle does.
    learned = replay(counts, 4, 1, "learned", predicted_BLE=counts)
    assert learned == oracle
