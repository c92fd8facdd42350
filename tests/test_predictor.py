"""History predictors and the stats-hook registry."""

import numpy as np
import pytest

from ds_moe_replicate.config import ReplicationConfig
from ds_moe_replicate.hooks import StatsHooks
from ds_moe_replicate.predictor import EmaPredictor, WindowPredictor, make_predictor


def test_ema_follows_its_formula():
    p = EmaPredictor(0.25)
    assert p.predict() is None
    p.observe(np.array([4, 0]))
    np.testing.assert_allclose(p.predict(), [4, 0])
    p.observe(np.array([0, 8]))
    np.testing.assert_allclose(p.predict(), [1, 6])


def test_window_is_the_mean_of_the_last_steps():
    p = WindowPredictor(2)
    for counts in ([2, 0], [4, 2], [6, 6]):
        p.observe(np.array(counts))
    np.testing.assert_allclose(p.predict(), [5, 4])


def test_steady_load_is_predicted_exactly_and_a_switch_is_followed():
    ema, window = EmaPredictor(0.5), WindowPredictor(3)
    for _ in range(5):
        for p in (ema, window):
            p.observe(np.array([90.0, 10.0]))
    for p in (ema, window):
        np.testing.assert_allclose(p.predict(), [90, 10])
    for _ in range(6):
        for p in (ema, window):
            p.observe(np.array([10.0, 90.0]))
    for p in (ema, window):
        assert np.argmax(p.predict()) == 1


def test_factory_and_bad_arguments():
    assert isinstance(make_predictor(ReplicationConfig(predictor="ema", ema_decay=0.9)), EmaPredictor)
    assert isinstance(make_predictor(ReplicationConfig(predictor="window", window=3)), WindowPredictor)
    with pytest.raises(ValueError, match="decay"):
        EmaPredictor(1.0)
    with pytest.raises(ValueError, match="window"):
        WindowPredictor(0)


def test_hooks_register_and_remove():
    hooks, seen = StatsHooks(), []
    a = hooks.register(lambda s: seen.append(("a", s)))
    hooks.register(lambda s: seen.append(("b", s)))
    hooks(1)
    a.remove()
    hooks(2)
    assert seen == [("a", 1), ("b", 1), ("b", 2)]
    with pytest.raises(TypeError, match="callable"):
        hooks.register(3)
