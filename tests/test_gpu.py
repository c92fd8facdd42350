"""On two or more CUDA devices (launch/gpu_check.sh): the replicated layer over NCCL, in inference
and in training, equals the stock layer, and every collective gets device tensors. Skipped on
machines without two GPUs (nothing here has run on a GPU yet)."""

import pytest
import torch

import fault_workers as fw
from ds_moe_replicate.testing import run_ranks

needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")


@needs_two_gpus
def test_nccl_inference_and_training_exact():
    for r in run_ranks(fw.training_exact, 2, timeout=300, backend="nccl"):
        assert max(r.diffs) <= 1e-5 and r.grad_diff <= 1e-5
        assert max(r.replicas) >= 1


@needs_two_gpus
@pytest.mark.parametrize("how", ["load_state_dict", "optimizer_step"])
def test_nccl_replicas_follow_weight_changes(how):
    for r in run_ranks(fw.weights_change, 2, how, timeout=300, backend="nccl"):
        assert max(r.diffs) <= 1e-5


@needs_two_gpus
def test_nccl_collectives_get_device_tensors():
    for r in run_ranks(fw.collectives_on_their_device, 2, timeout=300, backend="nccl"):
        assert r.error is None, r.error
