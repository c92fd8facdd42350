"""The main job through the real `deepspeed` launcher on 2 CPU ranks (tiny sizes)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ds_moe_replicate.testing import free_port, remove_shm_buffers

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("deepspeed") is None and not (Path(sys.executable).parent / "deepspeed").exists(),
                    reason="the deepspeed launcher is not installed")
def test_main_job_through_the_deepspeed_launcher(tmp_path):
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    out = tmp_path / "rows.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    port = free_port()
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(port), "launch/infer.py",
           "--deepspeed_config", "configs/demo.json", "--batch", "2", "--seq", "64", "--hidden", "32", "--ffn", "64",
           "--warmup", "5", "--steps", "2", "--topic-shares", "0,0.7", "--json", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        remove_shm_buffers(port)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| topic 70% |" in proc.stdout and "replicated" in proc.stdout
    rows = json.loads(out.read_text())
    rep = [r for r in rows if r["mode"] == "replicated"]
    assert len(rep) == 2
    for r in rep:
        assert r["max_abs_diff"] <= 1e-5 and r["dropped_tokens"] == 0
    hot = next(r for r in rows if r["mode"] == "replicated" and r["workload"] == "topic 70%")
    stock = next(r for r in rows if r["mode"] == "stock" and r["workload"] == "topic 70%")
    assert hot["balancedness"] > stock["balancedness"]
    assert next(r for r in rows if r["mode"] == "stock_capacity" and r["workload"] == "topic 70%")["dropped_tokens"] > 0

