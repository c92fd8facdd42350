"""The real workload: the stdlib document split, the byte-level MoE language model, and training
with trace recording on 2 gloo ranks."""

import json
import math
import os

import lm_workers
import numpy as np
import pytest

from ds_moe_replicate.stdlib_text import is_held_out, list_documents, load_corpus
from ds_moe_replicate.testing import run_ranks
from ds_moe_replicate.traces import load_trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_tree(root, names):
    for name in names:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(f"# {name}\n" + "x = 1\n" * 100)


def test_split_is_by_file_disjoint_and_deterministic(tmp_path):
    names = [f"pkg{i % 7}/mod_{i}.py" for i in range(300)] + ["site-packages/skip.py", "__pycache__/no.py"]
    _fake_tree(tmp_path, names)
    a = load_corpus(str(tmp_path))
    b = load_corpus(str(tmp_path))
    train = {d.path for d in a.train}
    held = {d.path for d in a.held_out}
    assert not train & held
    assert train | held == {n for n in names if n.startswith("pkg")}
    assert [d.path for d in b.held_out] == sorted(held) and [d.path for d in b.train] == sorted(train)
    # About a tenth held out, decided by the path alone: a kept file's side does not change when
    # files are added or removed.
    assert 10 <= len(held) <= 55
    _fake_tree(tmp_path, [f"new/extra_{i}.py" for i in range(50)])
    c = load_corpus(str(tmp_path))
    assert {d.path for d in c.held_out} - {d.path for d in c.held_out if d.path.startswith("new/")} == held
    assert all(is_held_out(p) for p in held) and not any(is_held_out(p) for p in train)


def test_real_stdlib_split_has_both_sides_and_windows_carry_their_document():
    paths = list_documents()
    assert len(paths) > 100 and len(paths) == len(set(paths))
    corpus = load_corpus(max_files=120)
    assert corpus.train and corpus.held_out
    x, docs = corpus.held_out_windows(6, 40, seed=1)
    x2, docs2 = corpus.held_out_windows(6, 40, seed=1)
    assert x.shape == (6, 41) and x.equal(x2) and docs.equal(docs2)
    for row, d in zip(x, docs):
        text = bytes(row.tolist()).rstrip(b"\0")
        assert text in corpus.held_out[int(d)].data
    batch = next(corpus.train_batches(4, 40, seed=0))
    assert batch.shape == (4, 41) and int(batch.max()) < 256


def test_local_model_equals_the_expert_parallel_ones():
    for k in (1, 2):
        for diffs, same_init in run_ranks(lm_workers.local_matches_expert_parallel, 2, k, timeout=180):
            assert diffs["stock"] <= 1e-5 and diffs["replicated"] <= 1e-5, (k, diffs)
            assert same_init


def test_training_records_traces_and_replication_off_gives_the_same_losses(tmp_path):
    steps = 4
    on, off = run_ranks(lm_workers.train_twice, 2, str(tmp_path), steps, timeout=240)[0]
    run = tmp_path / "on"
    for name in ("model_full.pt", "trace_train.json", "trace_heldout.json", "summary.json"):
        assert (run / name).exists(), name
    assert (run / "checkpoint" / "latest").exists()
    trace = load_trace(str(run / "trace_train.json"))
    # One trace batch per step, every layer; each counts all routes of both ranks (2 x 2 x 32, k=1).
    assert trace.counts_BLE.shape == (steps, 2, 4)
    assert (trace.counts_BLE.sum(axis=2) == 2 * 2 * 32).all()
    held = load_trace(str(run / "trace_heldout.json"))
    assert held.counts_BLE.shape == (4, 2, 4) and (held.counts_BLE.sum(axis=2) == 2 * 1 * 32).all()
    summary = json.loads((run / "summary.json").read_text())
    assert summary == on and len(on["history"]) == steps
    assert summary["data"]["held_out_documents"] > 0 and summary["replication"]["enabled"]
    assert math.isfinite(on["heldout"]["loss_after"]) and on["heldout"]["loss_after"] < on["heldout"]["loss_before"]
    assert on["heldout"]["replicas_after"] > 0 and off["heldout"]["replicas_after"] == 0
    assert not off["replication"]["enabled"]
    # Replication never changes what is computed: same losses step by step, same held-out loss.
    np.testing.assert_allclose([h["loss"] for h in on["history"]], [h["loss"] for h in off["history"]], rtol=1e-5)
    assert on["heldout"]["loss_after"] == pytest.approx(off["heldout"]["loss_after"], rel=1e-5)


def test_exact_check_compares_replicated_and_stock_steps_on_the_same_weights(tmp_path):
    steps = 4
    good, bad = run_ranks(lm_workers.train_checked, 2, str(tmp_path), steps, 2, timeout=240)[0]
    checks = good["exact_check"]
    assert [c["step"] for c in checks] == list(range(steps))
    # Measured on every checked step: replicated loss and every gradient against the stock layer's.
    for c in checks:
        assert c["loss_rel_diff"] <= 1e-5 and c["l_aux_rel_diff"] <= 1e-5 and c["grad_rel_diff_max"] <= 1e-5, c
        # The step's own forward computed exactly what the check's replicated forward did.
        assert c["same_as_step"], c
    assert any(c["replicas_active"] > 0 for c in checks)
    assert good["exact_check_max"]["grad_rel_diff_max"] == max(c["grad_rel_diff_max"] for c in checks)
    # A replicated path that computes wrongly (replica outputs off by 1%) is caught.
    assert any(c["replicas_active"] > 0 for c in bad["exact_check"])
    assert max(c["grad_rel_diff_max"] for c in bad["exact_check"]) > 1e-4, bad["exact_check"]
