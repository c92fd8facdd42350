"""Every predictor on 2 real ranks: exact outputs, the same plan on every rank, and lookahead's
fallback when a prefetch is late."""

import pytest

import moe_workers as mw
from ds_moe_replicate.testing import run_ranks


@pytest.mark.parametrize("predictor", ["ema", "window", "lookahead", "learned", "oracle"])
def test_every_predictor_is_exact_and_ranks_agree(predictor):
    r0, r1 = run_ranks(mw.predictor_run, 2, predictor)
    assert max(rec[2] for rec in r0 + r1) <= 1e-5
    # Same plan version and the same placement on both ranks at every step and layer.
    assert [rec[3:5] for rec in r0] == [rec[3:5] for rec in r1]
    assert max(rec[3] for rec in r0) >= 1  # a plan was made and used
    if predictor in ("lookahead", "learned", "oracle"):
        # Topics alternate every batch; layer 1 is predicted for this very batch.
        later = [rec for rec in r0 if rec[1] == 1 and rec[0] >= 2]
        assert min(rec[5] for rec in later) >= 0.9
        l1 = [rec[7] for rec in later]
        assert (max(l1) == 0.0) if predictor == "oracle" else (sum(l1) / len(l1) < 0.3)


def test_late_prefetch_falls_back_to_the_old_plan_on_every_rank():
    r0, r1 = run_ranks(mw.predictor_run, 2, "lookahead", 6, 1, 3)
    layer1 = {rec[0]: rec for rec in r0 if rec[1] == 1}
    layer1_r1 = {rec[0]: rec for rec in r1 if rec[1] == 1}
    # At step 3 rank 1 reports its transfers in flight: both ranks keep the step-2 plan.
    assert layer1[3][6] and layer1_r1[3][6]
    assert layer1[3][3] == layer1[2][3] and layer1_r1[3][3] == layer1[3][3]
    # Outputs stay exact, and the next step moves on to a newer plan.
    assert max(rec[2] for rec in r0 + r1) <= 1e-5
    assert layer1[4][3] > layer1[3][3]
