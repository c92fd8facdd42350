"""Replication for DeepSpeed AutoEP: tiny random Mixtral and Qwen3-MoE on 2 gloo ranks, compared
with AutoEP as DeepSpeed ships it (eval logits, training losses and parameters, checkpoints), the
monitor's CSV files, the never-applied warning and the transformers guard."""

import pytest
import torch

pytest.importorskip("transformers")

from autoep_workers import checkpoint_round_trip, csv_monitor, eval_equal, never_applied, train_equal

from ds_moe_replicate import ReplicationConfigError, configure_replication
from ds_moe_replicate.compat import check_transformers_for_autoep
from ds_moe_replicate.testing import run_ranks

W = 2


@pytest.mark.parametrize("via", ["initialize", "configure"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_eval_logits_equal_autoep_with_replicas_active(family, via):
    runs = run_ranks(eval_equal, W, family, via)
    for run in runs:
        assert run.layer_types == ["ReplicatedAutoEPLayer"]
        assert run.max_abs_logit_diff <= 1e-5
        assert sum(run.replicas[1:]) > 0, run.replicas
    # NOTE: a rank's tokens may all stay on home experts (prefer_local), so one rank is enough.
    assert max(r.tampered_diff for r in runs) > 1e-3, "replica slots computed no rows (a wrong copy went unseen)"


@pytest.mark.parametrize("family,zero,via", [("mixtral", 0, "initialize"), ("mixtral", 2, "configure"),
                                             ("qwen3_moe", 0, "configure"), ("qwen3_moe", 2, "initialize")])
def test_training_matches_autoep(family, zero, via):
    for run in run_ranks(train_equal, W, family, zero, via, 10):
        assert len(run.rep_losses) == 10 and all(r > 0 for r in run.replicas[1:]), run.replicas
        for a, b in zip(run.stock_losses, run.rep_losses):
            assert abs(a - b) <= 1e-5 * abs(a)
        assert run.max_rel_param_diff <= 1e-5
        assert run.stock_losses[0] != run.stock_losses[-1]


def test_checkpoint_round_trip_with_stock_autoep():
    for run in run_ranks(checkpoint_round_trip, W, "mixtral"):
        assert sum(run.replicas) > 0
        assert run.stock_from_replicated == 0.0 and run.replicated_from_stock == 0.0
        assert all(loss > 0 for loss in run.losses_after_load)


def test_csv_monitor_gets_replication_stats():
    found = run_ranks(csv_monitor, W, "mixtral")[0]
    names = sorted(found)
    for layer in (0, 1):
        for field in ("balancedness", "replicas", "bytes_moved", "exposed_wait_ms"):
            assert f"Replication_layer{layer}_{field}.csv" in names, names
    rows = found["Replication_layer0_replicas.csv"]
    assert rows[0] == ["step", "replicas"] and len(rows) == 4
    assert [int(r[0]) for r in rows[1:]] == [0, 1, 2]
    assert float(rows[-1][1]) >= 1
    assert all(0 < float(r[1]) <= 1 for r in found["Replication_layer0_balancedness.csv"][1:])


def test_enabled_section_never_applied_warns_once_on_rank_0():
    logs = run_ranks(never_applied, W)
    assert len(logs[0]) == 1 and "no MoE layer" in logs[0][0]
    assert logs[1] == []


def test_enabled_section_with_no_layer_is_an_error():
    with pytest.raises(ReplicationConfigError, match="no replicable MoE layer"):
        configure_replication(torch.nn.Linear(2, 2), {"moe_replication": {"enabled": True}})
    assert configure_replication(torch.nn.Linear(2, 2), {"moe_replication": {"enabled": False}}) == 0


def test_transformers_guard_names_the_versions():
    check_transformers_for_autoep("5.18.0")
    for bad in ("5.24.0", "4.57.1", "5.19.0.dev0"):
        with pytest.raises(RuntimeError, match=r"transformers>=5.18,<5.19 \(found " + bad.replace(".", r"\.")):
            check_transformers_for_autoep(bad)
