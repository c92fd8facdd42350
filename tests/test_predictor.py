"""History predictors and the stats-hook registry."""

import numpy as np
import pytest

from ds_moe_replicate.hooks import StatsHooks
from ds_moe_replicate.predictor import PREDICTORS, EmaPredictor, WindowPredictor, make_predictor


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
    assert isinstance(make_predictor("ema", ema_decay=0.9), EmaPredictor)
    assert isinstance(make_predictor("window", window=3), WindowPredictor)
    assert sorted(PREDICTORS) == ["ema", "learned", "lookahead", "oracle", "window"]
    with pytest.raises(ValueError, match="unknown predictor 'nope'"):
        make_predictor("nope")
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


def _run(predictor, trace):
    """Feed a trace of counts; returns the predicted hottest expert before each step (None first)."""
    guesses = []
    for counts in trace:
        pred = predictor.predict()
        guesses.append(None if pred is None else int(np.argmax(pred)))
        predictor.observe(np.asarray(counts, dtype=float))
    return guesses


def _hot(expert, n=8, hot=70.0, rest=5.0):
    row = np.full(n, rest)
    row[expert] = hot
    return row


def test_drifting_hot_expert_is_followed_with_a_short_lag():
    # The hot expert moves one place every 6 steps.
    trace = [_hot((t // 6) % 8) for t in range(36)]
    for predictor in (EmaPredictor(0.5), WindowPredictor(2)):
        guesses = _run(predictor, trace)
        right = [g == (t // 6) % 8 for t, g in enumerate(guesses) if t % 6 >= 2]
        assert all(right), guesses


def test_periodic_switching_defeats_history():
    # Topics alternate every step: the history's favourite is the previous step's topic (EMA)
    # or a tie (window of 2); either way it is right at most half the time.
    trace = [_hot(0 if t % 2 == 0 else 5) for t in range(20)]
    for predictor in (EmaPredictor(0.5), WindowPredictor(2)):
        guesses = _run(predictor, trace)[2:]
        truth = [0 if t % 2 == 0 else 5 for t in range(2, 20)]
        assert sum(g == t for g, t in zip(guesses, truth)) <= len(truth) // 2 + 1


def test_topic_switch_recovers_within_a_few_steps():
    trace = [_hot(1)] * 10 + [_hot(6)] * 10
    guesses = _run(EmaPredictor(0.5), trace)
    assert guesses[10] == 1  # the switch cannot be seen coming
    assert all(g == 6 for g in guesses[12:])
