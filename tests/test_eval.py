"""The accuracy-retention harness: the module CLI on a model folder laid out as on the hub, the
deepspeed launcher on 2 CPU ranks, and GLUE-format local files with the offline metric scripts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import hf_workers as hw  # noqa: E402
from ds_moe_replicate.testing import free_port, remove_shm_buffers, run_ranks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
           PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


def _check_lossless(report, modes=("stock", "replicated")):
    for mode in modes:
        assert report["max_abs_logit_diff"][mode] <= 1e-5, report["max_abs_logit_diff"]
        assert report["retention"][mode] == 1.0, report["retention"]
        assert report["modes"][mode]["dropped_tokens"] == 0


def test_cli_on_a_hub_layout_folder(tmp_path):
    """A tiny Switch saved with save_pretrained (as google/switch-base-8 is laid out on the hub),
    fine-tuned on the synthetic task through the DeepSpeed engine, then all four modes."""
    from ds_moe_replicate.eval.models import load_model

    model, _ = load_model("tiny-switch")
    folder = tmp_path / "switch-tiny-8"
    model.save_pretrained(folder)
    assert (folder / "config.json").exists()
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "ds_moe_replicate.eval", "--model", str(folder), "--task", "synthetic",
                           "--train-steps", "300", "--out", str(out), "--no-progress"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| replicated |" in proc.stdout and "| predicted_routing |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["fine_tune"]["steps"] == 300
    assert report["modes"]["baseline"]["metrics"]["accuracy"] > 0.8  # chance is 0.5
    _check_lossless(report)
    # The seed paper's scheme routes on other inputs than the router's: its logits move.
    assert report["max_abs_logit_diff"]["predicted_routing"] > 1e-2
    for mode in report["modes"].values():
        assert mode["ms_per_batch"] > 0 and 0 < mode["balancedness"] <= 1.0


def test_launcher_two_cpu_ranks(tmp_path):
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.exists():
        pytest.skip("the deepspeed launcher is not installed")
    out = tmp_path / "report.json"
    port = free_port()
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(port), "launch/evaluate.py",
           "--model", "tiny-switch", "--task", "synthetic", "--train-steps", "0", "--eval-size", "96",
           "--batch-size", "16", "--modes", "baseline,stock,replicated", "--out", str(out), "--no-progress"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    finally:
        remove_shm_buffers(port)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["ep_size"] == 2 and report["examples"] == 96
    _check_lossless(report)
    # With 2 ranks the home placement is uneven on this model; the replicated layer evens it out.
    assert report["modes"]["replicated"]["balancedness"] >= report["modes"]["stock"]["balancedness"]


def test_glue_from_local_files_with_offline_metrics(tmp_path):
    task_dir = tmp_path / "mrpc"
    task_dir.mkdir()
    rows = [{"sentence1": f"the cat sat on mat number {i}", "sentence2": f"a cat sat on the mat {i % 3}",
             "label": i % 2, "idx": i} for i in range(40)]
    for split in ("train", "validation"):
        (task_dir / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    [report] = run_ranks(hw.eval_in_process, 1, dict(model="tiny-switch", task="mrpc", data_dir=str(tmp_path),
                                                     train_steps=0, batch_size=16, modes=["baseline", "replicated"]),
                         timeout=300)
    assert report["examples"] == 40
    metrics = report["modes"]["baseline"]["metrics"]
    assert set(metrics) >= {"accuracy", "f1"} and metrics["_source"] == "local"  # hub unreachable
    _check_lossless(report, modes=("replicated",))


def test_stdlib_task_on_two_ranks(tmp_path):
    """Held-out next-byte prediction of a (tiny, untrained) byte-level MoE model in the four modes:
    the expert-parallel ones keep the baseline's logits; intervals bracket their estimates."""
    import lm_workers
    import torch

    from ds_moe_replicate.byte_lm import ByteLMConfig, build_byte_lm

    cfg = ByteLMConfig(hidden=32, heads=2, layers=2, experts=4, k=2, ffn=32, seq=32, seed=5)
    torch.save({"config": cfg.to_dict(), "state_dict": build_byte_lm(cfg, kind="local").state_dict()},
               tmp_path / "model_full.pt")
    report = run_ranks(lm_workers.lm_eval, 2, str(tmp_path), 20, timeout=240)[0]
    assert report["windows"] == 20 and report["tokens"] == 20 * 32 and report["ep_size"] == 2
    assert list(report["modes"]) == ["baseline", "stock", "replicated", "predicted_routing"]
    for mode in ("stock", "replicated"):
        assert report["max_abs_logit_diff"][mode] <= 1e-5 and report["retention"][mode] == 1.0
    assert report["modes"]["replicated"]["replicas"] > 0  # replicas were in use, and changed nothing
    assert report["max_abs_logit_diff"]["predicted_routing"] > 1e-3
    for mode, r in report["modes"].items():
        assert r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1]
        assert r["perplexity_ci"][0] <= r["perplexity"] <= r["perplexity_ci"][1]
        lo, hi = report["retention_ci"][mode]
        assert lo <= report["retention"][mode] <= hi
