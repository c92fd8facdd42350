"""``moe_replication.kernels`` -> implementation, the package without triton, tuned parameters."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ds_moe_replicate import ops
from ds_moe_replicate.kernels import _launch


def test_torch_and_auto_on_cpu_use_the_twins(monkeypatch):
    cpu = torch.device("cpu")
    assert ops.use_triton("torch", cpu) is False
    assert ops.use_triton("auto", cpu) is False
    assert ops.use_triton("torch", torch.device("cuda")) is False
    # "auto" takes the kernels on CUDA only where their compiled tests passed on that device kind.
    monkeypatch.setattr(ops, "verified", lambda device: False)
    assert ops.use_triton("auto", torch.device("cuda")) is False
    monkeypatch.setattr(ops, "verified", lambda device: True)
    assert ops.use_triton("auto", torch.device("cuda")) is ops.HAS_TRITON


def test_verified_reads_the_device_kinds_the_kernel_tests_passed_on(tmp_path, monkeypatch):
    path = tmp_path / "verified.json"
    assert _launch.verified(torch.device("cpu"), path) is False
    assert _launch.verified(torch.device("cuda", 0), path) is False  # no file: nothing verified
    monkeypatch.setattr(_launch, "device_name", lambda device: "NVIDIA H200")
    path.write_text(json.dumps({"devices": ["NVIDIA H200"]}))
    assert _launch.verified(torch.device("cuda", 0), path) is True
    path.write_text(json.dumps({"devices": ["NVIDIA A100"]}))
    assert _launch.verified(torch.device("cuda", 0), path) is False


def test_triton_refused_with_the_field_named(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    monkeypatch.setattr(ops, "HAS_TRITON", True)
    with pytest.raises(ops.KernelUnavailable, match=r"moe_replication\.kernels.*TRITON_INTERPRET=1"):
        ops.use_triton("triton", cpu)
    assert ops.use_triton("triton", torch.device("cuda")) is True
    monkeypatch.setattr(ops, "interpreting", lambda: True)
    assert ops.use_triton("triton", cpu) is True
    monkeypatch.setattr(ops, "HAS_TRITON", False)
    with pytest.raises(ops.KernelUnavailable, match=r"moe_replication\.kernels.*not installed"):
        ops.use_triton("triton", torch.device("cuda"))
    assert ops.use_triton("auto", torch.device("cuda")) is False
    with pytest.raises(ValueError, match=r"moe_replication\.kernels must be one of"):
        ops.use_triton("cuda", cpu)


def test_package_imports_and_routes_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from ds_moe_replicate import ReplicatedMoE, ops\n"
        "from ds_moe_replicate.kernels import HAS_TRITON\n"
        "assert not HAS_TRITON\n"
        "e, w, c, g = ops.topk_gating(torch.randn(5, 4), 2, kernels='auto')\n"
        "assert e.shape == (5, 2) and int(c.sum()) == 10\n"
        "try:\n"
        "    ops.use_triton('triton', torch.device('cpu'))\n"
        "except ops.KernelUnavailable as err:\n"
        "    print('refused:', err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused: moe_replication.kernels is 'triton' but triton is not installed" in out.stdout


def test_tuned_parameters_by_device_and_shape(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"devices": {"cpu": {"permute": {"H=781,float16": {"BLOCK_N": 64, "bogus": 3}}}}}))
    defaults = {"BLOCK_N": 32, "BLOCK_H": 128}
    cpu = torch.device("cpu")
    assert _launch.tuned("permute", cpu, "H=781,float16", defaults, path) == {"BLOCK_N": 64, "BLOCK_H": 128}
    assert _launch.tuned("permute", cpu, "H=782,float16", defaults, path) == defaults
    assert _launch.tuned("combine", cpu, "H=781,float16", defaults, path) == defaults
    assert _launch.tuned("permute", cpu, "H=781,float16", defaults, tmp_path / "missing.json") == defaults


def test_shipped_tuned_file_is_valid():
    table = json.loads(_launch.TUNED_PATH.read_text())
    for kernels in table["devices"].values():
        for kernel, shapes in kernels.items():
            assert kernel in ("topk_gating", "assign_slots", "permute", "combine")
            assert all(isinstance(v, int) for params in shapes.values() for v in params.values())


def test_forced_parameters_win_inside_the_block_only():
    defaults = {"BLOCK_T": 32, "num_warps": 4}
    cpu = torch.device("cpu")
    with _launch.forced("combine", {"BLOCK_T": 8}):
        assert _launch.tuned("combine", cpu, "H=768,K=1,bfloat16", defaults) == {"BLOCK_T": 8, "num_warps": 4}
        assert _launch.tuned("permute", cpu, "H=768,bfloat16", defaults) == defaults
    assert _launch.tuned("combine", cpu, "H=768,K=1,bfloat16", defaults) == defaults
